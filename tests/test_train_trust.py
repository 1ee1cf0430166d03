"""gpt2_train_main.py, as a user runs it: what it saves and what it refuses (issue 19).

- divergence at the last step (training or dev) saves nothing: model.ckpt keeps
  the last good training state;
- with --do_eval, model.ckpt is saved after the final evaluation and holds the
  true best dev perplexity, so a later resume never replaces model_best.ckpt
  with a worse model;
- a resume names every setting that differs from the checkpoint's and applies
  the new optimizer settings;
- step settings: -1 is off, 0 and other negatives are refused, as is a
  negative early_stopping_patience;
- a config's public value that is no field is refused, naming the field meant.

Each case runs the command line, checks its exit status and one-line message,
and that every input file is byte-identical afterwards. One case of each item
runs gpt2_train_main.py as a subprocess; the others run the same command line
in this process (run_main), which saves importing torch each time.
"""
import hashlib
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import prepare_data
from test_train import (DEV_LINES, REPO_ROOT, SUBPROCESS_ENV, TEST_LINES,  # noqa: F401
                        TRAIN_LINES, load_ckpt, model_config, read_metrics,
                        train, train_config, write_lines)
from test_train_safety import run_cli
import script_server

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LIKELY_CAUSE = ("Likely cause: a learning rate too high for this model (peak lr 1e+30 "
                "in {cfg}): lower it, lengthen warmup_steps or clip gradients "
                "(gradient_clip max_norm)")


# ------------------------------------------------------------------ helpers

def prepared_data(directory, max_seq_length):
    directory.mkdir()
    write_lines(directory / "train.txt", TRAIN_LINES)
    write_lines(directory / "dev.txt", DEV_LINES)
    write_lines(directory / "test.txt", TEST_LINES)
    prepare_data.main(["--quiet", "--data_dir", str(directory),
                       "--max_seq_length", str(max_seq_length)])
    return directory


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """Data prepared at max_seq_length 24 (and 20), a tiny model config, and a
    good run of 2 steps (dev evaluation at step 2) to resume from."""
    root = tmp_path_factory.mktemp("trust")
    data = prepared_data(root / "data", 24)
    short = prepared_data(root / "data20", 20)
    model = model_config(root)
    cfg = train_config(root, data, eval_steps=2)
    good = root / "good"
    assert train("--do_train", "--from_scratch", "--config_model", model,
                 "--config_train", cfg, "--output_dir", good,
                 "--stop_after_steps", 2) == 0
    return {"root": root, "data": data, "data20": short, "model": model, "cfg": cfg,
            "good": good}


def copy_of_good_run(inputs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(inputs["good"], out)
    return out


def digests(*paths):
    """sha256 of every file under `paths` (files or directories)."""
    found = {}
    for path in map(str, paths):
        files = [path] if os.path.isfile(path) else [
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
        for name in files:
            with open(name, "rb") as f:
                found[name] = hashlib.sha256(f.read()).hexdigest()
    return found


def cli(*args):
    """gpt2_train_main.py run as the user runs it."""
    return script_server.run([sys.executable, "gpt2_train_main.py", "--quiet",
                           *map(str, args)], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def here(capsys):
    """The same command line run in this process: a CompletedProcess alike."""
    def run(*args):
        code, out, err = run_cli(capsys, *args)
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def runner(how, here):
    return cli if how == "subprocess" else here


def error_line(proc):
    """The one line of an error exit (notes may come before it)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), proc.stderr
    return lines[-1]


def notes(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("note: ")]


# ------------------------------------------------------------------ 8: divergence at the last step

@pytest.mark.parametrize("do_eval,how", [(False, "subprocess"), (True, "here")])
def test_divergence_at_the_last_step_keeps_the_good_training_state(inputs, tmp_path,
                                                                   here, do_eval, how):
    """Resumed at a learning rate of 1e30, step 3 (the last) updates the
    weights to ~1e26: still finite, but the next forward overflows. Neither
    the dev loss (--do_eval) nor model.ckpt may take that model."""
    out = copy_of_good_run(inputs, tmp_path)
    bad = train_config(tmp_path, inputs["data"], name="bad_lr", eval_steps=2,
                       opt={"optimizer": {"type": "AdamW",
                                          "kwargs": {"lr": 1e30, "weight_decay": 0.01}}})
    given = digests(out / "model.ckpt", out / "model_best.ckpt", inputs["data"],
                    inputs["model"], bad)
    proc = runner(how, here)(
               "--do_train", *(["--do_eval"] if do_eval else []), "--checkpoint",
               out / "model.ckpt", "--config_model", inputs["model"], "--config_train",
               bad, "--output_dir", out, "--stop_after_steps", 3)
    what = ("the dev loss at step 3 is nan (not finite)" if do_eval else
            "after step 3 the loss on the first training batch is nan (not finite: "
            "the weights overflow)")
    assert error_line(proc) == (
        f"error: training stopped: {what}; nothing was saved: {out / 'model.ckpt'} is "
        f"left as it was. " + LIKELY_CAUSE.format(cfg=bad))
    assert digests(out / "model.ckpt", out / "model_best.ckpt", inputs["data"],
                   inputs["model"], bad) == given
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))
    assert not [r for r in read_metrics(out) if r["split"] == "dev" and r["step"] == 3]
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model.ckpt", "model_best.ckpt"]


# ------------------------------------------------------------------ 9: model.ckpt after the final evaluation

def test_model_ckpt_is_saved_after_the_final_evaluation_with_the_true_best(inputs,
                                                                           tmp_path, here):
    """Step 3 is no multiple of eval_steps (2): --do_eval evaluates it after
    training. model.ckpt must carry that evaluation, so that the resumed run
    compares its evaluations against the true best."""
    out = copy_of_good_run(inputs, tmp_path)
    given = digests(inputs["data"], inputs["model"], inputs["cfg"])
    proc = cli("--do_train", "--do_eval", "--checkpoint", out / "model.ckpt",
               "--config_train", inputs["cfg"], "--output_dir", out,
               "--stop_after_steps", 3)
    assert proc.returncode == 0, proc.stderr
    state, best = load_ckpt(out / "model.ckpt"), load_ckpt(out / "model_best.ckpt")
    dev = {r["step"]: r["ppl"] for r in read_metrics(out) if r["split"] == "dev"}
    assert list(dev) == [2, 3] and dev[3] < dev[2]  # the final evaluation is the best
    assert state["step"] == 3 and state["last_eval_step"] == 3
    assert state["best_dev_ppl"] == best["dev_perplexity"] == dev[3]
    assert best["step"] == 3 and state["evals_since_best"] == 0
    # The resumed run (evaluating at 4 and 6) keeps model_best.ckpt the best of all.
    proc = here("--do_train", "--do_eval", "--checkpoint", out / "model.ckpt",
                "--config_train", inputs["cfg"], "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    dev = {r["step"]: r["ppl"] for r in read_metrics(out) if r["split"] == "dev"}
    assert list(dev) == [2, 3, 4, 6]
    best = load_ckpt(out / "model_best.ckpt")
    assert best["dev_perplexity"] == min(dev.values())
    assert load_ckpt(out / "model.ckpt")["best_dev_ppl"] == min(dev.values())
    assert digests(inputs["data"], inputs["model"], inputs["cfg"]) == given


# ------------------------------------------------------------------ 10: resume with changed settings

def test_resume_names_every_changed_setting_and_applies_the_optimizer_settings(
        inputs, tmp_path, here):
    changed = train_config(tmp_path, inputs["data20"], name="changed", eval_steps=2,
                           max_seq_length=20, warmup_steps=1,
                           opt={"optimizer": {"type": "AdamW",
                                              "kwargs": {"lr": 3e-3, "weight_decay": 30.0}},
                                "gradient_clip": {"type": "clip_grad_norm_",
                                                  "kwargs": {"max_norm": 1.0}}})
    given = digests(inputs["good"], inputs["data20"], inputs["model"], changed)
    out = tmp_path / "resumed"
    proc = cli("--do_train", "--checkpoint", inputs["good"] / "model.ckpt",
               "--config_train", changed, "--output_dir", out, "--stop_after_steps", 3)
    assert proc.returncode == 0, proc.stderr
    assert notes(proc)[0] == (
        f"note: settings differ from the checkpoint's, and the new ones apply: "
        f"data_dir {str(inputs['data'])!r} -> {str(inputs['data20'])!r}, "
        f"max_seq_length 24 -> 20, opt.optimizer.kwargs.weight_decay 0.01 -> 30.0, "
        f"warmup_steps 2 -> 1 (to keep the checkpoint's, "
        f"resume with the training config it was trained with)")
    state = load_ckpt(out / "model.ckpt")
    decayed, not_decayed = state["optimizer"]["param_groups"]
    assert decayed["weight_decay"] == 30.0 and not_decayed["weight_decay"] == 0.0
    assert state["config"]["opt"]["optimizer"]["kwargs"]["weight_decay"] == 30.0
    # The new decay applied: AdamW scales every matrix by 1 - lr * weight_decay
    # (about 0.92 at step 3's lr of 2.7e-3); at 0.01 a matrix's norm moves by
    # well under 1%.
    before = load_ckpt(inputs["good"] / "model.ckpt")["model"]
    name = "decoder.self_attns.0.Q_dense.weight"
    assert state["model"][name].norm() < 0.95 * before[name].norm()
    # Resuming with the settings it was saved with: no note.
    proc = here("--do_train", "--checkpoint", out / "model.ckpt", "--config_train",
                changed, "--output_dir", out, "--stop_after_steps", 4)
    assert proc.returncode == 0, proc.stderr
    assert notes(proc) == []
    assert digests(inputs["good"], inputs["data20"], inputs["model"], changed) == given


# ------------------------------------------------------------------ 12: step settings

STEPS_WHY = "must be a positive number of steps, or -1 to turn it off"
PATIENCE_WHY = ("must be a positive number of evaluations, or -1 to turn early "
                "stopping off")


@pytest.mark.parametrize("setting,value,why,how", [
    ("display_steps", 0, STEPS_WHY, "subprocess"),
    ("eval_steps", 0, STEPS_WHY, "here"),
    ("checkpoint_steps", 0, STEPS_WHY, "here"),
    ("sample_steps", 0, STEPS_WHY, "here"),
    ("checkpoint_steps", -2, STEPS_WHY, "here"),
    ("early_stopping_patience", -5, PATIENCE_WHY, "here"),
    ("early_stopping_patience", 0, PATIENCE_WHY, "here"),
])
def test_step_settings_of_zero_or_below_minus_one_are_refused(inputs, tmp_path, here,
                                                              setting, value, why, how):
    cfg = train_config(tmp_path, inputs["data"], **{setting: value})
    given = digests(inputs["data"], inputs["model"], cfg)
    out = tmp_path / "out"
    proc = runner(how, here)("--do_train", "--from_scratch", "--config_model",
                             inputs["model"], "--config_train", cfg, "--output_dir", out)
    assert error_line(proc) == (f"error: {setting} = {value} in training config {cfg}: "
                                f"{why}")
    assert not out.exists()
    assert digests(inputs["data"], inputs["model"], cfg) == given


# ------------------------------------------------------------------ 13: names that are no field

def no_such(names, listed_in):
    return (f"sets {names}: no such setting exists, so it would be ignored: remove it "
            f"(the settings are listed in {listed_in}), or start a helper value's name "
            f"with _")


@pytest.mark.parametrize("line,message,how", [
    ("gradient_checkpoint = True",
     "sets gradient_checkpoint (did you mean gradient_checkpointing?), which is not a "
     "setting: fix the name (the settings are listed in configs/config_train.py)",
     "subprocess"),
    ("pipeline_parallel = True", no_such("pipeline_parallel", "configs/config_train.py"),
     "here"),
    ("zero_stage = 3", no_such("zero_stage", "configs/config_train.py"), "here"),
    ("base_lr = 3e-3", no_such("base_lr", "configs/config_train.py"), "here"),
])
def test_a_training_config_value_that_is_no_field_is_refused(inputs, tmp_path, here, line,
                                                             message, how):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(open(train_config(tmp_path, inputs["data"])).read() + line + "\n")
    given = digests(inputs["data"], inputs["model"], cfg)
    out = tmp_path / "out"
    proc = runner(how, here)("--do_train", "--from_scratch", "--config_model",
                             inputs["model"], "--config_train", cfg, "--output_dir", out)
    assert error_line(proc) == f"error: training config {cfg} {message}"
    assert not out.exists()
    assert digests(inputs["data"], inputs["model"], cfg) == given


@pytest.mark.parametrize("line,message", [
    ("n_layers = 3",
     "sets n_layers (did you mean n_layer?), which is not a setting: fix the name (the "
     "settings are listed in configs/config_model_117M.py)"),
    ("gradient_checkpointing = True",
     no_such("gradient_checkpointing", "configs/config_model_117M.py")),
    ("shard_model = True", no_such("shard_model", "configs/config_model_117M.py")),
    ("lora = {'r': 8}", no_such("lora", "configs/config_model_117M.py")),
    ("n_layer = 5", "sets n_layer = 5 but hparams has 2: build hparams from them "
                    "(gpt2_hparams(n_vocab=n_vocab, ...) as configs/config_model_117M.py "
                    "does)"),
])
def test_a_model_config_value_that_is_no_field_is_refused(inputs, tmp_path, here, line,
                                                          message):
    model = tmp_path / "model.py"
    model.write_text(open(inputs["model"]).read() + line + "\n")
    given = digests(inputs["data"], inputs["cfg"], model)
    out = tmp_path / "out"
    proc = here("--do_train", "--from_scratch", "--config_model", model,
                "--config_train", inputs["cfg"], "--output_dir", out)
    assert error_line(proc) == f"error: model config {model} {message}"
    assert not out.exists()
    assert digests(inputs["data"], inputs["cfg"], model) == given


def test_helpers_stay_the_users_own_and_the_original_pipeline_is_noted(inputs, tmp_path,
                                                                       here):
    """_names, imported modules, functions and classes are a config's helpers;
    the original example's data-pipeline dicts are accepted with a note."""
    cfg = tmp_path / "helpers.py"
    cfg.write_text("import os\nimport math as m\nfrom os.path import join\n"
                   + open(train_config(tmp_path, inputs["data"], max_train_epoch=1,
                                       eval_steps=-1)).read()
                   + "_base_lr = 3e-3\n_gradient_checkpoint = True\n"
                     "def pipeline_parallel(x):\n    return x\nclass Lora:\n    pass\n"
                     "train_hparam = {'batch_size': 4, 'shuffle': True}\n")
    model = tmp_path / "model.py"
    model.write_text("import math\nfrom utils.model import gpt2_hparams\n_width = 16\n"
                     "n_layer = 2\nhparams = gpt2_hparams(50257, 32, _width, 2, n_layer)\n")
    given = digests(inputs["data"], cfg, model)
    proc = here("--do_train", "--from_scratch", "--config_model", model,
                "--config_train", cfg, "--output_dir", tmp_path / "out",
                "--stop_after_steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert notes(proc) == [
        f"note: training config {cfg} sets train_hparam (the original example's texar "
        f"data pipeline), which this trainer does not read: batches come from "
        f"train_batch_size, eval_batch_size and test_batch_size, shuffled every epoch"]
    assert digests(inputs["data"], cfg, model) == given
    assert torch.isfinite(load_ckpt(tmp_path / "out" / "model.ckpt")["model"][
        "word_embedder._embedding"]).all()
