"""A checkpoint or hparams.json is data: it never chooses code, and bad sizes,
bad weights and wrong paths are one-line errors before a model is built.

texar builds whatever class an hparams "type" names, so the old checkpoints'
texar "model_hparams" dict could run a shell command. The tests below hand the
scripts such a checkpoint and check that nothing ran; the first test shows the
same payload does run when the dict reaches texar, so the others test something.
"""
import copy
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import gpt2_generate_main
import gpt2_train_main
import prepare_data
from utils.checkpoints.weights import checkpoint_model_fields, load_weights, resolve_model, save_checkpoint
from utils.errors import UserError, run_main
from utils.model import (build_model, build_peak_bytes, count_parameters,
                         gpt2_hparams, hparams_from_sizes, parameter_count)
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")
TINY = dict(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2, n_layer=2)


# ------------------------------------------------------------------ helpers

def popen_spec(marker):
    """A texar "type" spec that, if built, runs `touch marker`."""
    return {"type": "subprocess.Popen",
            "kwargs": {"args": ["sh", "-c", f"touch {marker}"]}}


def poison_type_specs(hparams, marker):
    """Every dict that names a "type" (feed-forward layers, initializer) runs code."""
    if isinstance(hparams, dict):
        if "type" in hparams:
            return popen_spec(marker)
        return {k: poison_type_specs(v, marker) for k, v in hparams.items()}
    if isinstance(hparams, list):
        return [poison_type_specs(v, marker) for v in hparams]
    return hparams


def poison_every_dict(hparams, marker):
    """Every dict at all (embed, decoder, attention, layers...) carries the spec."""
    if isinstance(hparams, dict):
        poisoned = {k: poison_every_dict(v, marker) for k, v in hparams.items()}
        poisoned.update(popen_spec(marker))
        return poisoned
    if isinstance(hparams, list):
        return [poison_every_dict(v, marker) for v in hparams]
    return hparams


POISONS = {"type_specs": poison_type_specs, "every_dict": poison_every_dict}


def old_format_checkpoint(path, hparams, model=None):
    """A checkpoint as written before model_sizes: texar hparams beside the weights."""
    model = model or build_model(gpt2_hparams(**TINY))
    save_checkpoint(str(path), {"model": model.state_dict(), "model_hparams": hparams})
    return str(path)


def new_format_checkpoint(path, sizes=None, model=None, **extra):
    model = model or build_model(gpt2_hparams(**TINY))
    state = {"model": model.state_dict(),
             **checkpoint_model_fields(gpt2_hparams(**TINY))}
    if sizes is not None:
        state["model_sizes"] = sizes
    state.update(extra)
    save_checkpoint(str(path), state)
    return str(path)


def wait_for(path, seconds=10.0):
    """Whether `path` appears within `seconds` (a spawned shell is asynchronous)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return os.path.exists(path)


def snapshot(directory):
    """Every file under `directory` with its size and modification time."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
    return found


def run_in_process(main, argv, monkeypatch, capsys):
    """(exit code, stdout, stderr) of a script's main run as its __main__ does."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def generate(argv, monkeypatch, capsys):
    return run_in_process(gpt2_generate_main.main, argv, monkeypatch, capsys)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path):
    """Prepared train/dev/test splits of a few lines, for gpt2_train_main.py."""
    d = tmp_path / "data"
    d.mkdir()
    write_lines(d / "train.txt", ["The bakery opens at six.", "Sheep graze on the hills.",
                                  "Snow covers the roofs.", "Boats come in."])
    write_lines(d / "dev.txt", ["The bakery sells bread."])
    write_lines(d / "test.txt", ["The bakery", "Every evening"])
    prepare_data.main(["--quiet", "--data_dir", str(d), "--max_seq_length", "24"])
    return d


def train_config(tmp_path, data_dir):
    settings = dict(data_dir=str(data_dir), max_seq_length=24, max_decoding_length=12,
                    train_batch_size=2, eval_batch_size=2, test_batch_size=2,
                    max_train_epoch=1, display_steps=1, eval_steps=-1,
                    checkpoint_steps=-1, warmup_steps=0, precision="fp32", seed=3,
                    opt={"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3}}})
    path = tmp_path / "train_cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return str(path)


# ------------------------------------------------------------------ item 1: no code from a checkpoint

def test_the_payload_runs_when_texar_is_handed_the_dict(tmp_path):
    """Control: the crafted hparams do run code if they reach texar."""
    marker = tmp_path / "MARKER"
    hparams = poison_type_specs(gpt2_hparams(**TINY), marker)
    with pytest.raises(Exception):
        build_model(hparams)  # texar runs Popen, then rejects what it returned
    assert wait_for(marker)


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_poisoned_old_checkpoint_runs_nothing_under_generate(tmp_path, poison):
    marker = tmp_path / "MARKER"
    ckpt = old_format_checkpoint(tmp_path / "x.ckpt",
                                 POISONS[poison](gpt2_hparams(**TINY), marker))
    proc = script_server.run(
        [sys.executable, "gpt2_generate_main.py", "--checkpoint", ckpt,
         "--max_decoding_length", "8", "--seed", "0"],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SAMPLE 1" in proc.stdout  # the sizes are valid: it generates
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_poisoned_old_checkpoint_runs_nothing_under_train_do_test(tmp_path, data_dir,
                                                                  poison):
    marker = tmp_path / "MARKER"
    ckpt = old_format_checkpoint(tmp_path / "x.ckpt",
                                 POISONS[poison](gpt2_hparams(**TINY), marker))
    out = tmp_path / "out"
    proc = script_server.run(
        [sys.executable, "gpt2_train_main.py", "--do_test", "--checkpoint", ckpt,
         "--config_train", train_config(tmp_path, data_dir), "--output_dir", str(out),
         "--quiet"],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "test_samples.tsv").read_text().splitlines()) == 2
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_old_format_checkpoint_loads_its_sizes_and_dropout(tmp_path):
    hparams = gpt2_hparams(**TINY, dropout=0.1)
    model = build_model(hparams).eval()
    ckpt = old_format_checkpoint(tmp_path / "old.ckpt", hparams, model)
    loaded = load_weights(resolve_model(checkpoint=ckpt))
    assert loaded.hparams == hparams  # rebuilt by our code, equal to what was saved
    assert loaded.hparams == hparams_from_sizes(TINY, {
        "embedding_dropout": 0.1, "residual_dropout": 0.1, "attention_dropout": 0.1})
    ids = torch.tensor([[50256, 464, 40706]])
    with torch.no_grad():
        want = model(inputs=ids, decoding_strategy="train_greedy").logits
        got = loaded.model(inputs=ids, decoding_strategy="train_greedy").logits
    assert torch.equal(want, got)


def plain_leaves(value, where="state"):
    """Yield (path, leaf) for every leaf that is not a tensor or plain number/text."""
    if isinstance(value, dict):
        assert "type" not in value, f"{where} names a type"
        for k, v in value.items():
            assert isinstance(k, (str, int)), where
            yield from plain_leaves(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from plain_leaves(v, f"{where}[{i}]")
    elif not (torch.is_tensor(value) or value is None
              or isinstance(value, (bool, int, float, str))):
        yield where, value


def test_trainer_checkpoints_hold_sizes_and_plain_data_only(tmp_path, data_dir):
    model_cfg = tmp_path / "model_cfg.py"
    model_cfg.write_text("from utils.model import gpt2_hparams\n"
                         "hparams = gpt2_hparams(50257, 32, 16, 2, 2, dropout=0.1)\n")
    out = tmp_path / "out"
    gpt2_train_main.main(["--quiet", "--do_train", "--from_scratch",
                          "--config_model", str(model_cfg),
                          "--config_train", train_config(tmp_path, data_dir),
                          "--output_dir", str(out), "--stop_after_steps", "1"])
    state = torch.load(out / "model.ckpt", map_location="cpu", weights_only=True)
    assert "model_hparams" not in state
    assert state["model_sizes"] == TINY
    assert all(type(v) is int for v in state["model_sizes"].values())
    assert state["model_dropout"] == {"embedding_dropout": 0.1, "residual_dropout": 0.1,
                                      "attention_dropout": 0.1}
    assert list(plain_leaves(state)) == []


BAD_SIZES = [
    ({**TINY, "n_vocab": 50257.0}, "n_vocab=50257.0 is not a whole number"),
    ({**TINY, "n_layer": True}, "n_layer=True is not a whole number"),
    ({**TINY, "n_ctx": "32"}, "n_ctx='32' is not a whole number"),
    ({**TINY, "n_head": -2}, "n_head=-2 is out of range"),
    ({**TINY, "n_layer": 0}, "n_layer=0 is out of range"),
    ({**TINY, "n_layer": 200_000_000}, "n_layer=200000000 is out of range"),
    ({**TINY, "n_embd": 10 ** 400}, f"n_embd={str(10 ** 400)[:40]}... is out of range"),
    ({k: v for k, v in TINY.items() if k != "n_head"}, "lacks n_head"),
    ({**TINY, "type": "subprocess.Popen"}, "unexpected entries 'type'"),
    ({**TINY, "n_head": 3}, "n_embd (16) must be divisible by n_head (3)"),
    (list(TINY.values()), "must be a mapping"),
    ({**TINY, "n_layer": {"type": "subprocess.Popen"}}, "n_layer={'type'"),
]


@pytest.mark.parametrize("sizes,message", BAD_SIZES)
def test_bad_model_sizes_are_one_line_errors(tmp_path, monkeypatch, capsys, sizes,
                                             message):
    ckpt = new_format_checkpoint(tmp_path / "bad.ckpt", sizes=sizes)
    before = snapshot(tmp_path)
    code, out, err = generate(["--checkpoint", ckpt, "--max_decoding_length", "8"],
                              monkeypatch, capsys)
    assert_one_line_error(code, err, f"checkpoint {ckpt} model_sizes", message)
    assert out == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("state,message", [
    ({"model_dropout": {"embedding_dropout": float("nan"), "residual_dropout": 0.0,
                        "attention_dropout": 0.0}}, "embedding_dropout=nan must be"),
    ({"model_dropout": {"type": "subprocess.Popen"}}, "model_dropout: the dropout rates"),
    ({"model_sizes": None, "model_hparams": None}, "must be a mapping"),
])
def test_bad_checkpoint_fields_are_one_line_errors(tmp_path, monkeypatch, capsys, state,
                                                   message):
    ckpt = new_format_checkpoint(tmp_path / "bad.ckpt", **state)
    code, _, err = generate(["--checkpoint", ckpt, "--max_decoding_length", "8"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, ckpt, message)


def without(hparams, *path):
    hparams = copy.deepcopy(hparams)
    node = hparams
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return hparams


def replaced(hparams, value, *path):
    hparams = copy.deepcopy(hparams)
    node = hparams
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return hparams


@pytest.mark.parametrize("legacy,message", [
    (without(gpt2_hparams(**TINY), "decoder", "num_blocks"), "no decoder.num_blocks"),
    (replaced(gpt2_hparams(**TINY), 2.0, "decoder", "num_blocks"),
     "n_layer=2.0 is not a whole number"),
    (replaced(gpt2_hparams(**TINY), [], "decoder"), "no decoder.dim"),
    (replaced(gpt2_hparams(**TINY), 10 ** 9, "vocab_size"), "n_vocab=1000000000 is out"),
    ("subprocess.Popen", "no vocab_size"),
])
def test_bad_old_model_hparams_are_one_line_errors(tmp_path, monkeypatch, capsys, legacy,
                                                   message):
    ckpt = old_format_checkpoint(tmp_path / "old.ckpt", legacy)
    code, _, err = generate(["--checkpoint", ckpt, "--max_decoding_length", "8"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, f"checkpoint {ckpt} model_hparams", message)


def test_checkpoint_without_sizes_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "weights_only.ckpt"
    save_checkpoint(str(path), {"model": build_model(gpt2_hparams(**TINY)).state_dict()})
    code, _, err = generate(["--checkpoint", str(path)], monkeypatch, capsys)
    assert_one_line_error(code, err, f"{path} has no model_sizes")


def hparams_dir(tmp_path, **raw_values):
    """A model directory holding only an hparams.json with these raw JSON values."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    values = {k: json.dumps(v) for k, v in TINY.items()}
    values.update(raw_values)
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in values.items()) + "}"
    (model_dir / "hparams.json").write_text(text)
    return model_dir


@pytest.mark.parametrize("field,raw,shown", [
    ("n_ctx", "32.7", "n_ctx=32.7 is not a whole number"),
    ("n_ctx", "32.0", "n_ctx=32.0 is not a whole number"),
    ("n_embd", "1e400", "n_embd=inf is not a whole number"),
    ("n_layer", "true", "n_layer=True is not a whole number"),
    ("n_head", '"2"', "n_head='2' is not a whole number"),
    ("n_vocab", "null", "n_vocab=None is not a whole number"),
    ("n_layer", "[2]", "n_layer=[2] is not a whole number"),
    ("n_ctx", "-1", "n_ctx=-1 is out of range"),
    ("n_head", "0", "n_head=0 is out of range"),
    ("n_layer", "100000", "n_layer=100000 is out of range: it must be between 1 and 1,000"),
    ("n_layer", "200000000", "n_layer=200000000 is out of range"),
    ("n_vocab", "10000001", "n_vocab=10000001 is out of range"),
    ("n_head", "3", "n_embd (16) must be divisible by n_head (3)"),
])
def test_bad_hparams_json_values_are_one_line_errors(tmp_path, monkeypatch, capsys,
                                                     field, raw, shown):
    model_dir = hparams_dir(tmp_path, **{field: raw})
    before = snapshot(tmp_path)
    code, out, err = generate(["--pretrain_model_dir", str(model_dir),
                               "--max_decoding_length", "8"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(model_dir / "hparams.json"), shown)
    assert out == ""
    assert snapshot(tmp_path) == before


def test_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, monkeypatch,
                                                                  capsys):
    """Within the size bounds, but about 200 TiB: refused from the numbers alone.

    The directory holds no weights, so reaching the download or build step
    would give another error; only the memory estimate can produce this one.
    """
    model_dir = hparams_dir(tmp_path, n_embd="65536", n_head="64", n_layer="1000")
    code, _, err = generate(["--pretrain_model_dir", str(model_dir),
                             "--max_decoding_length", "8"], monkeypatch, capsys)
    assert_one_line_error(code, err, str(model_dir / "hparams.json"), "needs about",
                          "TiB but only", "n_layer=1000")
    assert os.listdir(model_dir) == ["hparams.json"]


def test_checkpoint_too_large_for_memory_is_refused_before_it_is_built(tmp_path,
                                                                       monkeypatch, capsys):
    sizes = {**TINY, "n_embd": 65536, "n_head": 64, "n_layer": 1000}
    path = tmp_path / "huge.ckpt"
    save_checkpoint(str(path), {"model": {}, "model_sizes": sizes})
    code, _, err = generate(["--checkpoint", str(path), "--max_decoding_length", "8"],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, str(path), "needs about", "TiB but only")


@pytest.mark.parametrize("sizes", [TINY, dict(n_vocab=50257, n_ctx=24, n_embd=12,
                                              n_head=3, n_layer=3)])
def test_memory_estimate_counts_what_texar_builds(sizes):
    """parameter_count is GPT-2's; build_peak_bytes adds texar's discarded parts."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from texar.torch.modules import GPT2Decoder
    assert parameter_count(sizes) == count_parameters(build_model(gpt2_hparams(**sizes)))
    full = GPT2Decoder(hparams=gpt2_hparams(**sizes))  # with cross-attention
    discarded_output_layer = sizes["n_vocab"] * sizes["n_embd"]
    assert build_peak_bytes(sizes) == 4 * (count_parameters(full) + discarded_output_layer)


# ------------------------------------------------------------------ item 4: non-finite weights

def test_generate_refuses_nan_weights_in_one_line(tmp_path):
    model = build_model(gpt2_hparams(**TINY))
    with torch.no_grad():
        model.decoder.self_attns[1].V_dense.weight[3, 5] = float("nan")
    ckpt = new_format_checkpoint(tmp_path / "nan.ckpt", model=model)
    before = snapshot(tmp_path)
    proc = script_server.run(
        [sys.executable, "gpt2_generate_main.py", "--checkpoint", ckpt,
         "--max_decoding_length", "8"],
        cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: fine-tuned checkpoint {ckpt} has non-finite weights "
                      f"(NaN or inf), first in decoder.self_attns.1.V_dense.weight: it "
                      f"cannot be used; load an earlier checkpoint saved before the "
                      f"loss went non-finite"]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


def test_inf_weights_are_refused_by_load_weights(tmp_path):
    model = build_model(gpt2_hparams(**TINY))
    with torch.no_grad():
        model.word_embedder._embedding[7, 0] = float("inf")
    ckpt = new_format_checkpoint(tmp_path / "inf.ckpt", model=model)
    with pytest.raises(UserError, match=r"first in word_embedder\._embedding"):
        load_weights(resolve_model(checkpoint=ckpt))


# ------------------------------------------------------------------ item 5: token ids

def test_vocabulary_smaller_than_the_tokenizer_is_a_one_line_error(tmp_path, monkeypatch,
                                                                   capsys):
    sizes = {**TINY, "n_vocab": 1000}
    model = build_model(gpt2_hparams(**sizes))
    path = tmp_path / "small_vocab.ckpt"
    save_checkpoint(str(path), {"model": model.state_dict(), "model_sizes": sizes})
    code, out, err = generate(["--checkpoint", str(path), "--max_decoding_length", "8"],
                              monkeypatch, capsys)
    assert_one_line_error(code, err, str(path), "n_vocab=1000 but the GPT-2 tokenizer "
                          "has 50257 tokens", "n_vocab >= 50257")
    assert out == ""


# ------------------------------------------------------------------ item 5: weight-flag paths

def weight_path_cases(tmp_path):
    """(flags, message) for each weight flag given the wrong kind of path."""
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    new_format_checkpoint(ckpt_dir / "model.ckpt")
    a_file = tmp_path / "model.ckpt"
    a_file.write_bytes(b"not a directory")
    tf_dir = tmp_path / "tf_model"
    tf_dir.mkdir()
    return {
        "checkpoint_dir": (["--checkpoint", str(ckpt_dir)],
                           f"--checkpoint {ckpt_dir} is a directory, not a checkpoint "
                           f"file: pass a file such as {ckpt_dir / 'model.ckpt'}"),
        "pretrain_model_dir_file": (["--pretrain_model_dir", str(a_file)],
                                    f"--pretrain_model_dir {a_file} is a file, not a "
                                    f"directory"),
        "pretrain_checkpoint_dir": (["--pretrain_checkpoint", str(tf_dir)],
                                    f"--pretrain_checkpoint {tf_dir} is a directory: pass "
                                    f"the checkpoint prefix inside it, e.g. "
                                    f"{tf_dir / 'model.ckpt'}"),
    }


CASES = ["checkpoint_dir", "pretrain_model_dir_file", "pretrain_checkpoint_dir"]


@pytest.mark.parametrize("case", CASES)
def test_weight_flag_paths_under_generate(tmp_path, monkeypatch, capsys, case):
    flags, message = weight_path_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    code, out, err = generate([*flags, "--max_decoding_length", "8"], monkeypatch, capsys)
    assert_one_line_error(code, err, message)
    assert out == ""
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", CASES)
def test_weight_flag_paths_under_train_before_any_step(tmp_path, data_dir, monkeypatch,
                                                       capsys, case):
    flags, message = weight_path_cases(tmp_path)[case]
    config = train_config(tmp_path, data_dir)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_in_process(
        gpt2_train_main.main,
        ["--quiet", "--do_train", *flags, "--config_train", config,
         "--output_dir", str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, message)
    assert not re.search(r"\bstep \d", stdout)  # no training step was taken
    # Nothing trained or written: the inputs are untouched and the output
    # directory holds no checkpoint, metrics, samples or temporary file.
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out" + os.sep)} == before
    assert [name for name in (os.listdir(out) if out.exists() else [])
            if not name.startswith(".")] == []
