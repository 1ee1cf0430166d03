"""gpt2_generate_main.py end to end, on TF-written tiny checkpoints.

The greedy continuations to match were computed by Hugging Face transformers'
GPT-2 from the same TensorFlow files (tests/fixtures/tf_gpt2/README.md).
"""
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gpt2_generate_main
from utils.checkpoint import checkpoint_model_fields, save_checkpoint
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams
from utils.processor import get_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
SAMPLE_RE = re.compile(r"=+ SAMPLE (\d+) =+\n(.*?)\n(?==+( SAMPLE|\n))", re.S)


def fixture(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        return os.path.join(FIXTURES, "models", name), json.load(f)


def run_cli(args, stdin="", env=None):
    return subprocess.run([sys.executable, "gpt2_generate_main.py", *args],
                          input=stdin, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def samples(stdout):
    return [text for _, text, _ in SAMPLE_RE.findall(stdout)]


def test_interactive_top_k_1_prints_the_reference_greedy_continuation():
    """The 'done when' of the generation issue, through a real subprocess."""
    encoder = get_encoder()
    for name in ("tiny_a", "tiny_b"):
        model_dir, ref = fixture(name)
        n_ctx = ref["hparams"]["n_ctx"]
        prompts = [g["prompt_text"] for g in ref["greedy"]]
        stdin = prompts[0] + "\n\n" + prompts[1] + "\n"  # an empty line in between
        result = run_cli(["--pretrain_model_dir", model_dir,
                          "--pretrain_checkpoint", os.path.join(model_dir, "model.ckpt"),
                          "--is_interactive", "--top_k", "1",
                          "--max_decoding_length", str(n_ctx)], stdin)
        assert result.returncode == 0, result.stderr
        assert "Prompt should not be empty!" in result.stdout
        assert result.stdout.count("Model input >>> ") == 4  # 3 lines, then EOF
        expected = [encoder.decode(g["output_ids"][len(g["prompt_ids"]):])
                    for g in ref["greedy"]]
        assert samples(result.stdout) == expected
        assert "Traceback" not in result.stderr


def test_bad_flag_gives_one_line_and_exit_2():
    model_dir, _ = fixture("tiny_a")
    result = run_cli(["--pretrain_model_dir", model_dir, "--temperature", "0"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --temperature must be > 0 (got 0.0)"]


def test_missing_model_files_and_no_network_give_one_error_line(tmp_path):
    closed = "http://127.0.0.1:9"  # discard port: nothing listens there
    result = run_cli(["--pretrain_model_dir", str(tmp_path / "model_117M")],
                     env={"GPT2_DOWNLOAD_BASE_URL": closed, "GPT2_DOWNLOAD_BACKOFF": "0"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_117M" in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0].rstrip())  # the last word
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "model_117M" / "model.ckpt.index")


# --- in-process runs: quicker, same code path -------------------------------

def run_main(argv, stdin="", monkeypatch=None, capsys=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = gpt2_generate_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_samples_from_scratch_in_batches_and_seeded(monkeypatch, capsys):
    model_dir, _ = fixture("tiny_b")
    argv = ["--pretrain_model_dir", model_dir, "--nsamples", "4", "--batch_size", "2",
            "--max_decoding_length", "20", "--temperature", "1.5", "--top_k", "0"]
    _, first, _ = run_main(argv + ["--seed", "1"], monkeypatch=monkeypatch, capsys=capsys)
    _, again, _ = run_main(argv + ["--seed", "1"], monkeypatch=monkeypatch, capsys=capsys)
    _, other, _ = run_main(argv + ["--seed", "2"], monkeypatch=monkeypatch, capsys=capsys)
    assert [int(n) for n, _, _ in SAMPLE_RE.findall(first)] == [1, 2, 3, 4]
    assert first.rstrip().endswith("=" * 80)
    assert first == again
    assert first != other


def test_greedy_strategy_equals_top_k_1(monkeypatch, capsys):
    model_dir, ref = fixture("tiny_a")
    prompt = ref["greedy"][1]["prompt_text"] + "\n"
    common = ["--pretrain_model_dir", model_dir, "--is_interactive",
              "--max_decoding_length", "20"]
    _, greedy, _ = run_main(common + ["--decoding_strategy", "greedy"], prompt,
                            monkeypatch, capsys)
    _, top1, _ = run_main(common + ["--top_k", "1"], prompt, monkeypatch, capsys)
    assert samples(greedy) == samples(top1) and samples(greedy)[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_follows_the_reference(dtype):
    """--dtype runs the same engine on 16-bit weights: the next-token logits stay
    close to the reference's, and the greedy continuation starts the same."""
    from utils.checkpoint import load_model
    from utils.generation import next_token_logits
    for name in ("tiny_a", "tiny_b"):
        model_dir, ref = fixture(name)
        model = load_model(pretrain_model_dir=model_dir).model.eval()
        full = next_token_logits(model, [ref["greedy"][0]["prompt_ids"]])
        half = next_token_logits(model.to(getattr(torch, dtype)),
                                 [ref["greedy"][0]["prompt_ids"]]).float()
        assert half.dtype == torch.float32 and full.shape == half.shape
        tolerance = 0.1 if dtype == "bfloat16" else 0.01
        assert (half - full).abs().max() < tolerance * full.abs().max()
        result = run_cli(["--pretrain_model_dir", model_dir, "--is_interactive",
                          "--decoding_strategy", "greedy", "--max_decoding_length",
                          str(len(ref["greedy"][0]["prompt_ids"]) + 3), "--dtype", dtype],
                         ref["greedy"][0]["prompt_text"] + "\n")
        assert result.returncode == 0 and f"({dtype})" in result.stderr, result.stderr
        g = ref["greedy"][0]
        expected = get_encoder().decode(g["output_ids"][len(g["prompt_ids"]):][:3])
        assert samples(result.stdout) == [expected]


def test_prompt_too_long_is_reported_and_the_session_goes_on(monkeypatch, capsys):
    model_dir, ref = fixture("tiny_a")
    too_long = " ".join(["word"] * 40)  # 40 tokens; the model has 32 positions
    stdin = too_long + "\n" + ref["greedy"][0]["prompt_text"] + "\n"
    code, out, err = run_main(["--pretrain_model_dir", model_dir, "--is_interactive",
                               "--max_decoding_length", "32", "--top_k", "1"],
                              stdin, monkeypatch, capsys)
    assert code == 0
    assert "error: the prompt is 40 tokens" in err and "32" in err
    assert len(samples(out)) == 1
    assert out.count("SAMPLE") == 1  # no banner for the refused prompt


def test_nsamples_per_prompt_in_interactive_mode(monkeypatch, capsys):
    model_dir, _ = fixture("tiny_a")
    _, out, _ = run_main(["--pretrain_model_dir", model_dir, "--is_interactive",
                          "--nsamples", "3", "--max_decoding_length", "12",
                          "--seed", "0"], "Hello\n", monkeypatch, capsys)
    assert [int(n) for n, _, _ in SAMPLE_RE.findall(out)] == [1, 2, 3]


def test_finetuned_checkpoint_is_used_over_pretrained(tmp_path, monkeypatch, capsys):
    hparams = gpt2_hparams(50257, 24, 8, 2, 1)
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": build_model(hparams).state_dict(),
                           **checkpoint_model_fields(hparams)})
    code, out, err = run_main(["--checkpoint", path, "--pretrain_checkpoint",
                               str(tmp_path / "absent" / "model.ckpt"),
                               "--max_decoding_length", "24", "--seed", "3"],
                              "", monkeypatch, capsys)
    assert code == 0 and len(samples(out)) == 1
    assert "fine-tuned checkpoint" in err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--nsamples", "3", "--batch_size", "2"], "must be divisible by --batch_size"),
    (["--max_decoding_length", "33"], "between 2 and the model's 32 positions"),
    (["--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
    (["--top_k", "-2"], "--top_k must be >= 0"),
    (["--beam_width", "0"], "--beam_width must be at least 1"),
    (["--checkpoint", "no/such/model.ckpt"], "checkpoint not found"),
    (["--config_model", "configs.nope"], "unknown config"),
])
def test_bad_flags_are_user_errors(args, message, monkeypatch, capsys):
    model_dir, _ = fixture("tiny_a")
    with pytest.raises(UserError, match=message):
        run_main(["--pretrain_model_dir", model_dir, *args], "", monkeypatch, capsys)


def test_top_p_alone_replaces_the_default_top_k():
    from utils.cli_args import check_sampling_args
    args = gpt2_generate_main.parse_args(["--top_p", "0.9"])
    check_sampling_args(args)
    assert args.top_k == 0
    args = gpt2_generate_main.parse_args(["--top_p", "0.9", "--top_k", "5"])
    check_sampling_args(args)
    assert args.top_k == 5
    args = gpt2_generate_main.parse_args([])
    check_sampling_args(args)
    assert args.top_k == 40


def test_seed_out_of_range_is_a_user_error():
    from utils.cli_args import check_sampling_args
    with pytest.raises(UserError, match="--seed"):
        check_sampling_args(gpt2_generate_main.parse_args(["--seed", str(2 ** 70)]))


def test_impossible_length_fails_before_the_weights_are_downloaded(tmp_path, monkeypatch,
                                                                   capsys):
    """Only hparams.json is fetched before --max_decoding_length is checked."""
    import http.server
    import threading

    requested = []
    hparams = json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
                          "n_head": 12, "n_layer": 12}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            if self.path.endswith("/hparams.json"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(hparams)))
                self.end_headers()
                self.wfile.write(hparams)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GPT2_DOWNLOAD_BASE_URL",
                           f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(UserError, match="model's 1024 positions"):
            run_main(["--pretrain_model_dir", str(tmp_path / "model_117M"),
                      "--max_decoding_length", "5000"], "", monkeypatch, capsys)
    finally:
        server.shutdown()
    assert requested == ["/124M/hparams.json"]
