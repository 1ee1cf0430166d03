"""gpt2_generate_main.py from prompts: --prompt(_file), --output_file, --stop_text,
--repetition_penalty, against the TF fixtures' greedy references and transformers."""
import json
import os

import pytest
import torch

from test_generate_cli import assert_one_line_error, fixture, run_script
from utils.decoding.generation import generate, next_token_logits, penalize_repetition
from utils.model import build_model, gpt2_hparams
from utils.processor import EOS_ID, get_encoder
from utils.decoding.stop_text import StopTexts, cut_at_stop
from utils.checkpoints.weights import load_weights, resolve_model

ENC = get_encoder()


def model_of(name):
    model_dir, ref = fixture(name)
    resolved = resolve_model(pretrain_model_dir=model_dir,
                             pretrain_checkpoint=os.path.join(model_dir, "model.ckpt"))
    return load_weights(resolved).model.eval(), model_dir, ref


@pytest.fixture(scope="module")
def tiny_a():
    return model_of("tiny_a")


def reference_continuations(ref):
    return [ENC.decode(g["output_ids"][len(g["prompt_ids"]):]) for g in ref["greedy"]]


def greedy_args(model_dir, ref, *more):
    return ["--pretrain_model_dir", model_dir, "--decoding_strategy", "greedy",
            "--max_decoding_length", str(ref["hparams"]["n_ctx"]), *more]


def test_prompt_file_in_shared_batches_gives_the_reference_continuations(tmp_path, tiny_a):
    model, model_dir, ref = tiny_a
    prompts = [g["prompt_text"] for g in ref["greedy"]]
    assert len({len(g["prompt_ids"]) for g in ref["greedy"]}) > 1  # lengths differ
    (tmp_path / "p.txt").write_text("\n".join(prompts[:1] + ["", "  "] + prompts[1:])
                                    + "\n", encoding="utf-8")
    out = tmp_path / "s.jsonl"
    # 2 samples a prompt, batches of 3: every batch mixes prompts.
    code, _, err = run_script(greedy_args(model_dir, ref, "--prompt_file",
                                          str(tmp_path / "p.txt"), "--nsamples", "2",
                                          "--batch_size", "3", "--output_file", str(out)))
    assert code in (0, None), err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = reference_continuations(ref)
    assert [(r["prompt"], r["sample"]) for r in rows] == [
        (p, n) for p in prompts for n in (1, 2)]
    assert [r["text"] for r in rows] == [t for t in expected for _ in (1, 2)]
    # and each prompt decoded alone
    for g, text in zip(ref["greedy"], expected):
        alone = generate(model, [g["prompt_ids"]], ref["hparams"]["n_ctx"],
                         strategy="greedy")[0]
        assert ENC.decode(alone) == text


def test_prompts_from_stdin_and_the_command_line(tiny_a):
    _, model_dir, ref = tiny_a
    prompts = [g["prompt_text"] for g in ref["greedy"]]
    code, out, err = run_script(greedy_args(model_dir, ref, "--prompt", prompts[0],
                                            "--prompt_file", "-"),
                                stdin="\n".join(prompts[1:]).encode("utf-8"))
    assert code in (0, None), err
    expected = reference_continuations(ref)
    for prompt, text in zip(prompts, expected):
        assert f"Model input >>> {prompt}\n{'=' * 40} SAMPLE 1 {'=' * 40}\n{text}\n" in out


def test_tsv_and_screen_formats_in_files(tmp_path, tiny_a):
    _, model_dir, ref = tiny_a
    prompt = "tab\there\nnot"  # a --prompt may hold what TSV must escape
    for name in ("s.tsv", "s.txt"):
        code, _, err = run_script(greedy_args(model_dir, ref, "--prompt", prompt,
                                              "--output_file", str(tmp_path / name),
                                              "--max_decoding_length", "12"))
        assert code in (0, None), err
    text = ENC.decode(generate(tiny_a[0], [ENC.encode(prompt)], 12, strategy="greedy")[0])
    tsv = (tmp_path / "s.tsv").read_text(encoding="utf-8")
    assert tsv == f"tab here not\t{text.replace(chr(10), ' ')}\n"
    screen = (tmp_path / "s.txt").read_text(encoding="utf-8")
    assert screen.endswith(f"SAMPLE 1 {'=' * 40}\n{text}\n{'=' * 80}\n")


def test_stop_text_ends_the_sample_and_its_decoding(tiny_a):
    model, _, ref = tiny_a
    g = ref["greedy"][1]
    full = g["output_ids"][len(g["prompt_ids"]):]
    text = ENC.decode(full)
    stop = ENC.decode(full[4:6])  # text from the middle of the continuation
    assert stop and text.find(stop) > 0
    calls = []

    def counting(rows):
        check = StopTexts(ENC, [stop, "never there"], rows)
        return lambda ids, done: calls.append(1) or check(ids, done)

    ids = generate(model, [g["prompt_ids"]], ref["hparams"]["n_ctx"], strategy="greedy",
                   stop_check=counting(1))[0]
    # decoding stopped at the first token whose text completes the stop text
    first = min(k for k in range(1, len(full) + 1) if stop in ENC.decode(full[:k]))
    assert ids == full[:first] and len(calls) == first
    assert cut_at_stop(ENC.decode(ids), [stop]) == text[:text.find(stop)]


def test_stop_text_through_the_script(tiny_a, tmp_path):
    _, model_dir, ref = tiny_a
    g = ref["greedy"][1]
    text = reference_continuations(ref)[1]
    stop = ENC.decode(g["output_ids"][len(g["prompt_ids"]) + 3:][:2])
    out = tmp_path / "s.jsonl"
    code, _, err = run_script(greedy_args(model_dir, ref, "--prompt", g["prompt_text"],
                                          "--stop_text", stop, "--output_file", str(out)))
    assert code in (0, None), err
    assert json.loads(out.read_text(encoding="utf-8"))["text"] == text[:text.find(stop)]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers_processor(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=gen) * 4
    input_ids = torch.randint(0, 50, (3, 12), generator=gen)  # with repeats
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3)[:, None], input_ids] = True
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    assert torch.equal(penalize_repetition(logits, seen, penalty), expected)


def test_greedy_with_repetition_penalty_follows_transformers_step_by_step(tiny_a):
    from transformers import RepetitionPenaltyLogitsProcessor
    model, _, ref = tiny_a
    prompts = [g["prompt_ids"] for g in ref["greedy"]]
    processor = RepetitionPenaltyLogitsProcessor(1.5)
    got = generate(model, prompts, 20, strategy="greedy", repetition_penalty=1.5)
    for prompt, ids in zip(prompts, got):
        seq = list(prompt)
        while len(seq) < 20:
            logits = next_token_logits(model, [seq]).float()
            seq.append(int(processor(torch.tensor([seq]), logits).argmax(-1)))
        assert ids == seq[len(prompt):]
        assert len(set(ids)) > 1  # the reference's plain greedy repeats one token


@pytest.mark.parametrize("setup, args, words", [
    (None, ["--prompt_file", "missing.txt"], ["cannot read --prompt_file"]),
    ("", ["--prompt_file", "p.txt"], ["holds no prompts"]),
    (b"fine\nbad \xff\n", ["--prompt_file", "p.txt"], ["line 2 of", "not valid UTF-8"]),
    (("word " * 40).strip(), ["--prompt_file", "p.txt", "--max_decoding_length", "32"],
     ["prompt on line 1 of", "40 tokens"]),
    ("x", ["--prompt", "x", "--repetition_penalty", "0"], ["--repetition_penalty must be > 0"]),
    ("x", ["--prompt", "x", "--stop_text", ""], ["--stop_text must not be empty"]),
    ("x", ["--prompt", "x", "--decoding_strategy", "beam", "--stop_text", "."],
     ["not beam search"]),
    ("x", ["--prompt", "x", "--is_interactive"], ["--is_interactive"]),
    ("x", ["--prompt", "x", "--output_file", "no/such/dir/s.jsonl"], ["does not exist"]),
])
def test_bad_prompt_input_is_one_line(tmp_path, monkeypatch, setup, args, words):
    model_dir, _ = fixture("tiny_a")
    monkeypatch.chdir(tmp_path)
    if setup is not None:
        data = setup if isinstance(setup, bytes) else setup.encode("utf-8")
        (tmp_path / "p.txt").write_bytes(data)
    code, _, err = run_script(["--pretrain_model_dir", model_dir, *args])
    assert_one_line_error(code, err, *words)
    assert not any(p.suffix == ".jsonl" for p in tmp_path.iterdir())
