"""gpt2_train_main.py: the pipeline, exact resume, perplexity, the test TSV, bad input.

Tiny models (vocabulary 50257, width 16, 2 layers) and a dozen lines of text
keep every run to a second or two.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gpt2_train_main
import prepare_data
from utils.data.records import PreparedSplit, record_dtype
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams
from utils.processor import EOS_ID
from utils.samples.test_split import sampling_for_test_split, tsv_field, write_test_samples
from utils.training.config import load_train_config
import script_server
from user_files import signals_as_from_a_terminal

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "tf_gpt2")

TRAIN_LINES = [
    "The bakery opens at six every morning.",
    "Fishing boats return when the tide comes in.",
    "Sheep graze on the hills.",
    "The river runs under the old stone bridge.",
    "Children walk to school along the river.",
    "Snow covers the rooftops in winter.",
    "The market sells cheese, honey and eggs.",
    "The keeper lights the lamp every evening.",
    "Trains leave for the city every hour.",
    "Hi.",
]
DEV_LINES = ["The bakery sells fresh bread.", "Boats leave the harbour at dawn.",
             "Snow falls."]
TEST_LINES = ["The bakery", "Every evening\tthe keeper", "In winter\u2028the children",
              "A form\x0bfeed and a\rcarriage return"]

# prepare_data ends a line wherever str.splitlines does (\u2028, \x0b, \r ...),
# so the test split holds these examples; tabs stay inside an example.
TEST_EXAMPLES = "\n".join(TEST_LINES).splitlines()


# Tiny models run as fast on one thread, and a CPU shared with other jobs
# makes multi-threaded steps stall; the subprocesses get the same setting.
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_lines(d / "train.txt", TRAIN_LINES)
    write_lines(d / "dev.txt", DEV_LINES)
    write_lines(d / "test.txt", TEST_LINES)
    prepare_data.main(["--quiet", "--data_dir", str(d), "--max_seq_length", "24"])
    return d


def model_config(tmp_path, dropout=0.0, n_ctx=32):
    path = tmp_path / f"model_d{dropout}.py"
    path.write_text("from utils.model import gpt2_hparams\n"
                    f"hparams = gpt2_hparams(50257, {n_ctx}, 16, 2, 2, dropout={dropout})\n")
    return str(path)


def train_config(tmp_path, data_dir, name="train_cfg", **overrides):
    settings = dict(data_dir=str(data_dir), max_seq_length=24, max_decoding_length=20,
                    train_batch_size=4, eval_batch_size=2, test_batch_size=3,
                    max_train_epoch=2, display_steps=1, eval_steps=2,
                    checkpoint_steps=-1, warmup_steps=2, lr_decay="cosine",
                    min_lr_ratio=0.1, gradient_accumulation_steps=1,
                    precision="fp32", seed=3,
                    opt={"optimizer": {"type": "AdamW",
                                       "kwargs": {"lr": 3e-3, "weight_decay": 0.01}},
                         "gradient_clip": {"type": "clip_grad_norm_",
                                           "kwargs": {"max_norm": 1.0}}})
    settings.update(overrides)
    path = tmp_path / f"{name}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return str(path)


def train(*args):
    return gpt2_train_main.main(["--quiet", *map(str, args)])


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("tokens_per_s", None)  # wall-clock dependent
    return records


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------ the pipeline

def test_pipeline_end_to_end_on_the_command_line(tmp_path, data_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, "gpt2_train_main.py", "--do_train", "--do_eval", "--do_test",
           "--from_scratch", "--config_model", model_config(tmp_path),
           "--config_train", train_config(tmp_path, data_dir),
           "--output_dir", str(out), "--quiet"]
    proc = script_server.run(cmd, cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # 10 examples, batch 4: 3 steps per epoch, 2 epochs.
    assert "Training done: 6 steps" in proc.stdout
    dev_line = [l for l in proc.stdout.splitlines() if l.startswith("dev: ")][-1]
    assert "3 examples" in dev_line
    for name in ("model.ckpt", "model_best.ckpt", "metrics.jsonl", "test_samples.tsv"):
        assert str(out / name) in proc.stdout  # tells where everything is

    state = load_ckpt(out / "model.ckpt")
    assert state["step"] == 6 and state["epoch"] == 2
    assert set(state) >= {"model", "model_sizes", "optimizer", "schedule", "rng",
                          "step", "epoch"}
    assert state["model_sizes"] == dict(n_vocab=50257, n_ctx=32, n_embd=16, n_head=2,
                                        n_layer=2)
    best = load_ckpt(out / "model_best.ckpt")
    assert best["step"] in (2, 4, 6)
    records = read_metrics(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["split"] == "dev"] == [2, 4, 6]
    # The dev line printed equals the last evaluation logged.
    last_dev = [r for r in records if r["split"] == "dev"][-1]
    assert f"perplexity {last_dev['ppl']:.6g}" in dev_line
    assert best["dev_perplexity"] == min(r["ppl"] for r in records if r["split"] == "dev")

    lines = (out / "test_samples.tsv").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(TEST_EXAMPLES)

    # The generator loads the fine-tuned checkpoint (the lead's loader contract).
    from utils.checkpoints.weights import load_weights, resolve_model
    loaded = load_weights(resolve_model(checkpoint=str(out / "model.ckpt")))
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state["model"][name])


def test_loss_falls_while_training(tmp_path, data_dir):
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir, max_train_epoch=8, eval_steps=-1)
    train("--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
          "--config_train", cfg, "--output_dir", out)
    losses = [r["loss"] for r in read_metrics(out) if r["split"] == "train"]
    assert len(losses) == 24
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0


def test_do_eval_after_training_evaluates_the_last_step_once(tmp_path, data_dir, capsys):
    """--do_eval reuses an evaluation made at the last step, else makes one,
    which counts for model_best.ckpt like any other."""
    out = tmp_path / "out"
    common = ["--do_train", "--do_eval", "--from_scratch", "--config_model",
              model_config(tmp_path)]
    train(*common, "--config_train", train_config(tmp_path, data_dir, eval_steps=4),
          "--output_dir", out)  # 6 steps: step 4 is evaluated in training, 6 after it
    stdout = capsys.readouterr().out
    dev = [r for r in read_metrics(out) if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [4, 6]
    dev_lines = [line for line in stdout.splitlines() if line.startswith("dev: ")]
    assert len(dev_lines) == 1 and f"perplexity {dev[-1]['ppl']:.6g}" in dev_lines[0]
    best = load_ckpt(out / "model_best.ckpt")
    assert best["dev_perplexity"] == min(r["ppl"] for r in dev)
    assert f"model_best.ckpt: best dev perplexity {best['dev_perplexity']:.6g}" in stdout
    # Evaluated at the last step already (2, 4, 6): no second evaluation.
    again = tmp_path / "again"
    train(*common, "--config_train", train_config(tmp_path, data_dir, name="every2"),
          "--output_dir", again)
    assert [r["step"] for r in read_metrics(again) if r["split"] == "dev"] == [2, 4, 6]


def test_the_outputs_listed_are_the_files_in_the_output_dir(tmp_path, data_dir, capsys):
    """A run resumed into another directory carries the best perplexity over,
    but has no model_best.ckpt there until it beats it: none is listed."""
    cfg = train_config(tmp_path, data_dir)  # evaluated every 2 steps
    a, b = tmp_path / "a", tmp_path / "b"
    train("--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
          "--config_train", cfg, "--output_dir", a, "--stop_after_steps", 2)
    capsys.readouterr()
    train("--do_train", "--checkpoint", a / "model.ckpt", "--config_train", cfg,
          "--output_dir", b, "--stop_after_steps", 3)
    outputs = capsys.readouterr().out.split("Outputs in")[1]
    listed = [line.split(": ")[0].strip() for line in outputs.splitlines()
              if line.startswith("  ")]
    assert listed == [str(b / "model.ckpt"), str(b / "metrics.jsonl")]
    assert sorted(os.listdir(b)) == ["metrics.jsonl", "model.ckpt"]
    assert load_ckpt(b / "model.ckpt")["best_dev_ppl"] is not None


# ------------------------------------------------------------------ resume

def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, data_dir):
    """Mid-epoch stop (step 4 of 3-step epochs) with dropout, warm-up and cosine decay."""
    model_cfg = model_config(tmp_path, dropout=0.1)
    cfg = train_config(tmp_path, data_dir)
    common = ["--config_model", model_cfg, "--config_train", cfg]
    a, b = tmp_path / "a", tmp_path / "b"
    train("--do_train", "--from_scratch", *common, "--output_dir", a)
    train("--do_train", "--from_scratch", *common, "--output_dir", b,
          "--stop_after_steps", 4)
    stopped = load_ckpt(b / "model.ckpt")
    assert (stopped["step"], stopped["epoch"], stopped["examples_done_in_epoch"]) == (4, 1, 4)
    train("--do_train", "--checkpoint", b / "model.ckpt", "--config_train", cfg,
          "--output_dir", b)

    assert read_metrics(a) == read_metrics(b)  # every step's loss, lr and dev result
    state_a, state_b = load_ckpt(a / "model.ckpt"), load_ckpt(b / "model.ckpt")
    assert state_a["step"] == state_b["step"] == 6
    for name, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][name]), name
    for key, value in state_a["optimizer"]["state"].items():
        for field, tensor in value.items():
            assert torch.equal(tensor, state_b["optimizer"]["state"][key][field])


def test_resume_mid_display_window_and_owed_evaluation(tmp_path, data_dir):
    """The first display after resuming covers the same steps as in one run, and
    an evaluation a Ctrl-C cut short is run on resuming."""
    cfg = train_config(tmp_path, data_dir, max_train_epoch=3, display_steps=2,
                       eval_steps=3)
    common = ["--from_scratch", "--config_model", model_config(tmp_path),
              "--config_train", cfg]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train("--do_train", *common, "--output_dir", a)
    # Stopped between displays (step 5; displays at 2, 4, 6, 8).
    train("--do_train", *common, "--output_dir", b, "--stop_after_steps", 5)
    train("--do_train", "--checkpoint", b / "model.ckpt", "--config_train", cfg,
          "--output_dir", b)
    assert read_metrics(a) == read_metrics(b)
    # Stopped at step 6 with its evaluation undone, as a Ctrl-C during it leaves it.
    train("--do_train", *common, "--output_dir", c, "--stop_after_steps", 6)
    state = load_ckpt(c / "model.ckpt")
    assert state["last_eval_step"] == 6
    state["last_eval_step"], state["last_eval"] = 3, None
    torch.save(state, c / "model.ckpt")
    metrics = (c / "metrics.jsonl").read_text().splitlines(keepends=True)
    (c / "metrics.jsonl").write_text("".join(
        line for line in metrics if json.loads(line)["split"] != "dev"
        or json.loads(line)["step"] != 6))
    train("--do_train", "--checkpoint", c / "model.ckpt", "--config_train", cfg,
          "--output_dir", c)
    assert read_metrics(a) == read_metrics(c)


def test_resuming_with_another_optimizer_is_an_error(tmp_path, data_dir):
    out = tmp_path / "out"
    train("--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
          "--config_train", train_config(tmp_path, data_dir), "--output_dir", out,
          "--stop_after_steps", 1)
    sgd = train_config(tmp_path, data_dir, name="sgd", opt={
        "optimizer": {"type": "SGD", "kwargs": {"lr": 0.1, "momentum": 0.9}}})
    with pytest.raises(UserError, match="trained with AdamW but .* configures SGD"):
        train("--do_train", "--checkpoint", out / "model.ckpt", "--config_train", sgd,
              "--output_dir", out)


def test_gradient_accumulation_gives_the_same_updates(tmp_path, data_dir):
    """Batch 4 vs 2 x 2 accumulated: the loss is normalised by the step's tokens.

    Plain SGD, so the weights show the gradients' agreement directly (Adam
    divides by sqrt(v) and magnifies float rounding in near-zero gradients).
    """
    model_cfg = model_config(tmp_path)
    runs = {}
    sgd = {"optimizer": {"type": "SGD", "kwargs": {"lr": 0.5}}}
    for batch, accum in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}a{accum}"
        cfg = train_config(tmp_path, data_dir, name=f"cfg{batch}{accum}", opt=sgd,
                           train_batch_size=batch, gradient_accumulation_steps=accum)
        train("--do_train", "--from_scratch", "--config_model", model_cfg,
              "--config_train", cfg, "--output_dir", out)
        runs[accum] = (read_metrics(out), load_ckpt(out / "model.ckpt")["model"])
    (m1, w1), (m2, w2) = runs[1], runs[2]
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    np.testing.assert_allclose([r["loss"] for r in m1], [r["loss"] for r in m2], rtol=1e-5)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-5, atol=1e-6)


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the training process")


def _train_steps_logged(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"train"' in line for line in path.read_text().splitlines())


def _start_long_training(tmp_path, data_dir, out):
    cfg = train_config(tmp_path, data_dir, max_train_epoch=1000, eval_steps=-1,
                       checkpoint_steps=1)
    cmd = [sys.executable, "gpt2_train_main.py", "--do_train", "--from_scratch",
           "--config_model", model_config(tmp_path), "--config_train", cfg,
           "--output_dir", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=signals_as_from_a_terminal)
    return proc, cfg


def test_kill_9_leaves_a_whole_checkpoint_and_training_goes_on(tmp_path, data_dir):
    out = tmp_path / "out"
    proc, cfg = _start_long_training(tmp_path, data_dir, out)
    try:
        _wait_for(lambda: _train_steps_logged(out) >= 8 or proc.poll() is not None)
        time.sleep(0.05)  # likely inside a step or a checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    state = load_ckpt(out / "model.ckpt")  # whole and readable
    step = state["step"]
    assert step >= 7
    train("--do_train", "--checkpoint", out / "model.ckpt", "--config_train", cfg,
          "--output_dir", out, "--stop_after_steps", step + 3)
    assert load_ckpt(out / "model.ckpt")["step"] == step + 3
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, step + 4))  # no duplicates from the killed run


def interrupt(proc) -> str:
    """Ctrl-C a training subprocess and wait for it (killed if it hangs); its stderr."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    out = tmp_path / "out"
    proc, cfg = _start_long_training(tmp_path, data_dir, out)
    try:
        _wait_for(lambda: _train_steps_logged(out) >= 3 or proc.poll() is not None)
    finally:
        stderr = interrupt(proc)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = load_ckpt(out / "model.ckpt")
    assert f"Interrupted at step {state['step']}: saved {out / 'model.ckpt'}" in stderr
    assert state["step"] == max(r["step"] for r in read_metrics(out))


# ------------------------------------------------------------------ perplexity

def _write_split(path, sequences, max_seq_length):
    rec = np.zeros(len(sequences), dtype=record_dtype(max_seq_length, 50257))
    rec["text_ids"] = EOS_ID
    for i, seq in enumerate(sequences):
        rec["length"][i] = len(seq)
        rec["text_ids"][i, :len(seq)] = seq
    np.save(path, rec, allow_pickle=False)


def test_do_eval_matches_reference_gpt2_on_a_tensorflow_checkpoint(tmp_path):
    """OpenAI-format checkpoint written by TensorFlow; NLL from transformers' GPT-2."""
    with open(os.path.join(FIXTURES, "reference", "tiny_a.json"), encoding="utf-8") as f:
        ref = json.load(f)["dev_nll"]
    model_dir = tmp_path / "model_tiny_a"
    model_dir.mkdir()
    for src_dir in (os.path.join(FIXTURES, "models", "tiny_a"),
                    os.path.join(REPO_ROOT, "utils", "gpt2_vocab")):
        for name in os.listdir(src_dir):
            (model_dir / name).write_bytes(open(os.path.join(src_dir, name), "rb").read())
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data / "dev.npy", ref["sequences"], 32)
    cfg = train_config(tmp_path, data, max_seq_length=32)

    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_eval", "--quiet",
                           "--pretrain_model_dir", str(model_dir), "--config_train", cfg],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("dev: ")][0]
    printed = float(line.split("perplexity ")[1].split()[0])
    reference = math.exp(ref["total_nll"] / ref["total_tokens"])
    assert f"{printed:.4g}" == f"{reference:.4g}"
    assert f"{ref['total_tokens']} tokens" in line


# ------------------------------------------------------------------ test TSV

def test_test_samples_tsv_has_one_tab_per_line(tmp_path, data_dir):
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir)
    args = ["--do_test", "--from_scratch", "--config_model", model_config(tmp_path),
            "--config_train", cfg, "--output_dir", out, "--seed", 5]
    train(*args)
    text = (out / "test_samples.tsv").read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    assert len(lines) == len(TEST_EXAMPLES) == len(text.splitlines())
    for line, original in zip(lines, TEST_EXAMPLES):
        assert line.count("\t") == 1
        context, continuation = line.split("\t")
        assert context == tsv_field(original.strip())
        assert "<|endoftext|>" not in continuation
    assert context == "carriage return"
    # The same seed gives the same samples.
    os.rename(out / "test_samples.tsv", tmp_path / "first.tsv")
    train(*args)
    assert (out / "test_samples.tsv").read_text(encoding="utf-8") == text


def test_continuation_stops_at_end_of_text(tmp_path, data_dir):
    """A model whose only likely token is <|endoftext|> continues with nothing."""
    model = build_model(gpt2_hparams(50257, 32, 16, 2, 2)).eval()
    with torch.no_grad():
        model.decoder._output_layer.weight.zero_()  # tied: the embedding too
        model.word_embedder._embedding[EOS_ID] = 1.0
        model.decoder.final_layer_norm.bias.fill_(1.0)
    args = gpt2_train_main.parse_args(["--do_test", "--decoding_strategy", "greedy"])
    flags = gpt2_train_main.check_args(args).sampling
    cfg = load_train_config(train_config(tmp_path, data_dir))
    split = PreparedSplit(str(data_dir / "test.npy"))
    from utils.processor import get_encoder
    path = tmp_path / "t.tsv"
    settings = sampling_for_test_split(split, flags, cfg, 32)
    write_test_samples(model, split, get_encoder(), settings, cfg, torch.device("cpu"),
                       str(path), False)
    assert all(line.endswith("\t") for line in path.read_text().split("\n")[:-1])


# ------------------------------------------------------------------ bad input

def test_missing_split_is_an_error(tmp_path, data_dir):
    os.remove(data_dir / "train.npy")
    with pytest.raises(UserError, match=r"prepared data not found: .*train\.npy.*prepare_data"):
        train("--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
              "--config_train", train_config(tmp_path, data_dir))


def test_max_seq_length_must_match_the_prepared_data(tmp_path, data_dir):
    with pytest.raises(UserError, match="prepared with max_seq_length 24"):
        train("--do_eval", "--from_scratch", "--config_model", model_config(tmp_path),
              "--config_train", train_config(tmp_path, data_dir, max_seq_length=30))


def test_data_longer_than_the_model_is_an_error(tmp_path, data_dir):
    with pytest.raises(UserError, match="16 positions"):
        train("--do_eval", "--from_scratch", "--config_model",
              model_config(tmp_path, n_ctx=16), "--config_train",
              train_config(tmp_path, data_dir))


def test_context_too_long_for_max_decoding_length(tmp_path, data_dir):
    with pytest.raises(UserError, match="raise --max_decoding_length"):
        train("--do_test", "--from_scratch", "--config_model", model_config(tmp_path),
              "--config_train", train_config(tmp_path, data_dir),
              "--max_decoding_length", 4)
    # Found before training, not after it.
    out = tmp_path / "out"
    with pytest.raises(UserError, match="raise --max_decoding_length"):
        train("--do_train", "--do_test", "--from_scratch", "--config_model",
              model_config(tmp_path), "--config_train", train_config(tmp_path, data_dir),
              "--max_decoding_length", 4, "--output_dir", out)
    assert not (out / "model.ckpt").exists()


def test_output_dir_that_cannot_be_written_is_an_error(tmp_path, data_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    common = ["--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
              "--config_train", train_config(tmp_path, data_dir)]
    with pytest.raises(UserError, match="is a file, not a directory"):
        train(*common, "--output_dir", a_file)
    with pytest.raises(UserError, match="cannot write to --output_dir"):
        train(*common, "--output_dir", a_file / "below")
    with pytest.raises(UserError, match="--output_dir is empty"):
        train(*common, "--output_dir", "")


def test_written_files_get_the_usual_permissions(tmp_path, data_dir):
    """Not mkstemp's private 0600: results are readable as the umask allows."""
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        train("--do_train", "--do_test", "--from_scratch", "--config_model",
              model_config(tmp_path), "--config_train", train_config(tmp_path, data_dir),
              "--output_dir", out, "--stop_after_steps", 1)
    finally:
        os.umask(old)
    for name in ("model.ckpt", "metrics.jsonl", "test_samples.tsv"):
        assert (os.stat(out / name).st_mode & 0o777) == 0o644, name


def test_nothing_to_do_and_bad_flags(tmp_path):
    with pytest.raises(UserError, match="nothing to do"):
        train()
    with pytest.raises(UserError, match="temperature"):
        train("--do_test", "--temperature", 0)


def test_corrupt_checkpoint_is_an_error(tmp_path, data_dir):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        train("--do_train", "--checkpoint", bad, "--config_train",
              train_config(tmp_path, data_dir))


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_eval",
                           "--config_train", "configs.no_such_config"],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config")
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ precision

def test_bf16_autocast_trains_on_cpu(tmp_path, data_dir):
    out = tmp_path / "out"
    train("--do_train", "--do_eval", "--from_scratch", "--config_model", model_config(tmp_path),
          "--config_train", train_config(tmp_path, data_dir, precision="bf16"),
          "--output_dir", out)
    losses = [r["loss"] for r in read_metrics(out) if r["split"] == "train"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    # Weights stay float32; only the computation is autocast.
    assert load_ckpt(out / "model.ckpt")["model"]["word_embedder._embedding"].dtype == torch.float32
