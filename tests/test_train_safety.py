"""gpt2_train_main.py never loses a trained model and never ends in a traceback.

- an --output_dir holding an earlier run is refused (--checkpoint continues it,
  --overwrite_output_dir starts over);
- one writer per output directory (<output_dir>/.lock);
- a loss that is not finite stops training without saving the diverged model;
- config typos, configs that exit or raise, bare config names, directories
  where files go, token ids outside the vocabulary, a full disk.

Each case checks the exit code, the one-line message and the files left.
"""
import errno
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt2_train_main
from test_train import (REPO_ROOT, SUBPROCESS_ENV, _start_long_training,  # noqa: F401
                        _train_steps_logged, _wait_for, _write_split, data_dir,
                        interrupt, load_ckpt, model_config, read_metrics,
                        train, train_config)
from utils.training import trainer as training
from utils.atomic import OutputDirLock, remove_stale_temp_files
from utils.errors import UserError, run_main
from utils.training.config import load_train_config
import script_server

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(capsys, *args):
    """gpt2_train_main as its command line runs it: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        run_main(gpt2_train_main.main, ["--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def error_line(err):
    """The one line of an error exit (notes may come before it)."""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


def snapshot(directory):
    """Every file's name and content digest, to prove nothing changed."""
    result = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                result[name] = hashlib.sha256(f.read()).hexdigest()
        else:
            result[name] = "<dir>"
    return result


@pytest.fixture
def job(tmp_path, data_dir):
    """A model config and a training config whose runs write all three files."""
    model = model_config(tmp_path)
    cfg = train_config(tmp_path, data_dir, eval_steps=1)
    return {"model": model, "cfg": cfg, "common": ["--from_scratch", "--config_model",
                                                    model, "--config_train", cfg]}


def train_once(job, out, *extra):
    train("--do_train", *job["common"], "--output_dir", out, "--stop_after_steps", 2,
          *extra)


# ------------------------------------------------------------------ no silent overwrite

def test_a_new_run_refuses_an_output_dir_holding_an_earlier_run(tmp_path, job):
    out = tmp_path / "out"
    train_once(job, out)
    before = snapshot(out)
    assert set(before) == {"model.ckpt", "model_best.ckpt", "metrics.jsonl"}
    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_train", "--quiet",
                           *job["common"], "--output_dir", str(out)],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert line == (f"error: --output_dir {out} already holds model.ckpt, model_best.ckpt, "
                    f"metrics.jsonl from an earlier run: continue that run with "
                    f"--checkpoint {out / 'model.ckpt'}, or pass --overwrite_output_dir "
                    f"to delete them and start over there, or choose another --output_dir")
    assert proc.stderr.count("\n") == 1
    assert snapshot(out) == before  # nothing changed, no lock or temporary file left


def test_only_the_files_that_exist_are_named(tmp_path, job, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')
    before = snapshot(out)
    code, _, err = run_cli(capsys, "--do_train", *job["common"], "--output_dir", out)
    line = error_line(err)
    assert code == 2
    assert "already holds metrics.jsonl from an earlier run" in line
    assert "model.ckpt" not in line and "--checkpoint" not in line  # nothing to continue
    assert snapshot(out) == before


def test_resuming_into_another_directory(tmp_path, job, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    train_once(job, a)
    resume = ["--do_train", "--checkpoint", a / "model.ckpt", "--config_train", job["cfg"],
              "--stop_after_steps", 3]
    # An empty directory: allowed.
    code, _, err = run_cli(capsys, *resume, "--output_dir", b)
    assert code == 0, err
    assert load_ckpt(b / "model.ckpt")["step"] == 3
    # A directory holding another run's files: refused, naming only those.
    c = tmp_path / "c"
    c.mkdir()
    (c / "model_best.ckpt").write_bytes(b"someone's best model")
    before = snapshot(c)
    code, _, err = run_cli(capsys, *resume, "--output_dir", c)
    assert code == 2
    line = error_line(err)
    assert (f"--output_dir {c} already holds model_best.ckpt that do not come from "
            f"--checkpoint {a / 'model.ckpt'}") in line
    assert "metrics.jsonl" not in line and "--overwrite_output_dir" in line
    assert snapshot(c) == before
    # Continuing in place is the normal resume.
    a_before = load_ckpt(a / "model.ckpt")["step"]
    code, _, err = run_cli(capsys, "--do_train", "--checkpoint", a / "model.ckpt",
                           "--config_train", job["cfg"], "--output_dir", a,
                           "--stop_after_steps", 3)
    assert code == 0, err
    assert (a_before, load_ckpt(a / "model.ckpt")["step"]) == (2, 3)


def test_weights_only_checkpoint_would_restart_over_the_run(tmp_path, job, capsys):
    out = tmp_path / "out"
    train_once(job, out)
    before = snapshot(out)
    code, _, err = run_cli(capsys, "--do_train", "--checkpoint", out / "model_best.ckpt",
                           "--config_train", job["cfg"], "--output_dir", out)
    assert code == 2
    line = error_line(err)
    assert "holds weights only, so training would start at step 0 over them" in line
    assert f"continue that run with --checkpoint {out / 'model.ckpt'}" in line
    assert snapshot(out) == before


def test_overwrite_output_dir_starts_over_without_mixing_runs(tmp_path, job, data_dir,
                                                             capsys):
    out = tmp_path / "out"
    train_once(job, out)
    (out / "test_samples.tsv").write_text("not a training output\tkept\n")
    # The new run evaluates nowhere: the old model_best.ckpt must not stay behind.
    no_eval = train_config(tmp_path, data_dir, name="no_eval", eval_steps=-1)
    code, _, err = run_cli(capsys, "--do_train", "--from_scratch", "--config_model",
                           job["model"], "--config_train", no_eval, "--output_dir", out,
                           "--stop_after_steps", 1, "--overwrite_output_dir")
    assert code == 0, err
    assert "deleted the earlier run's model.ckpt, model_best.ckpt, metrics.jsonl" in err
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model.ckpt", "test_samples.tsv"]
    assert [r["step"] for r in read_metrics(out)] == [1]  # the new run only
    assert load_ckpt(out / "model.ckpt")["step"] == 1


def test_overwrite_output_dir_refuses_to_delete_its_own_checkpoint(tmp_path, job, capsys):
    out = tmp_path / "out"
    train_once(job, out)
    before = snapshot(out)
    code, _, err = run_cli(capsys, "--do_train", "--checkpoint", out / "model.ckpt",
                           "--config_train", job["cfg"], "--output_dir", out,
                           "--overwrite_output_dir")
    assert code == 2
    assert error_line(err) == (
        f"error: --overwrite_output_dir would delete --checkpoint {out / 'model.ckpt'} "
        f"itself: copy it out of {out} first, or drop --overwrite_output_dir to "
        f"continue in place")
    assert snapshot(out) == before


def test_overwrite_output_dir_needs_do_train(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--do_eval", "--overwrite_output_dir")
    assert code == 2
    assert error_line(err) == ("error: --overwrite_output_dir only applies to --do_train: "
                               "drop it")


# ------------------------------------------------------------------ one writer

def test_a_second_trainer_on_the_same_directory_stops_at_once(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    proc, cfg = _start_long_training(tmp_path, data_dir, out)
    try:
        _wait_for(lambda: _train_steps_logged(out) >= 2 or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read()
        assert (out / ".lock").read_text().strip() == str(proc.pid)
        code, _, err = run_cli(capsys, "--do_train", "--from_scratch", "--config_model",
                               model_config(tmp_path), "--config_train", cfg,
                               "--output_dir", out, "--overwrite_output_dir")
        assert code == 2
        assert error_line(err) == (
            f"error: another run (pid {proc.pid}) is writing to --output_dir {out} "
            f"(it holds {out / '.lock'}): wait for it to finish or stop it, or choose "
            f"another --output_dir")
        assert proc.poll() is None  # the first run goes on, its files untouched
    finally:
        stderr = interrupt(proc)
    assert proc.returncode == 130, stderr
    state = load_ckpt(out / "model.ckpt")
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, state["step"] + 1))  # one run's records, in order
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model.ckpt"]  # lock removed


def test_do_test_alone_takes_the_lock_too(tmp_path, job, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with OutputDirLock(str(out)):
        code, _, err = run_cli(capsys, "--do_test", *job["common"], "--output_dir", out)
    assert code == 2
    assert f"another run (pid {os.getpid()}) is writing to --output_dir {out}" in error_line(err)
    assert os.listdir(out) == []


def test_lock_is_exclusive_and_survives_a_stale_lock_file(tmp_path):
    (tmp_path / ".lock").write_text("999999999\n")  # left by a killed run: not locked
    with OutputDirLock(str(tmp_path), "--output_dir"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=f"another run \\(pid {os.getpid()}\\)"):
            OutputDirLock(str(tmp_path)).acquire()
    assert os.listdir(tmp_path) == []
    with OutputDirLock(str(tmp_path)):  # free again
        pass


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_removed_only_when_their_writer_is_dead(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [f"model.ckpt.{dead}.k2j4_x9q.tmp", "model_best.ckpt.abcd1234.tmp",
             f"metrics.jsonl.{dead}.zz.tmp"]
    kept = [f"model.ckpt.{alive}.k2j4_x9q.tmp",    # a writer still running
            "notes.tmp", "other.ckpt.123.ab.tmp",  # not ours
            "model.ckpt"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(str(tmp_path), ["model.ckpt", "model_best.ckpt",
                                            "metrics.jsonl", "test_samples.tsv"])
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_a_killed_writers_temp_file_is_cleared_on_the_next_run(tmp_path, job, capsys):
    out = tmp_path / "out"
    train_once(job, out)
    leftover = out / f"model.ckpt.{_dead_pid()}.abc_1234.tmp"
    leftover.write_bytes(b"half a checkpoint")
    code, _, err = run_cli(capsys, "--do_train", "--checkpoint", out / "model.ckpt",
                           "--config_train", job["cfg"], "--output_dir", out,
                           "--stop_after_steps", 3)
    assert code == 0, err
    assert not leftover.exists()


# ------------------------------------------------------------------ non-finite loss

def _nan_at_call(monkeypatch, bad_call):
    """Make the training loss NaN on the bad_call-th forward pass (1-based)."""
    real = training.lm_nll
    calls = {"n": 0}

    def lm_nll(model, ids, lengths, per_token=False, starts=None):
        nll, count = real(model, ids, lengths, per_token, starts)
        if not per_token:
            calls["n"] += 1
            if calls["n"] == bad_call:
                nll = nll * float("nan")
        return nll, count
    monkeypatch.setattr(training, "lm_nll", lm_nll)


@pytest.mark.parametrize("display_steps,checkpoint_steps,saved_step", [
    (1, 2, 2),    # found at once: step 4 is a display and a checkpoint step
    (-1, 3, 3),   # found one step later (no sync per step), still reported as step 4
])
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
        tmp_path, data_dir, monkeypatch, capsys, display_steps, checkpoint_steps,
        saved_step):
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir, display_steps=display_steps,
                       checkpoint_steps=checkpoint_steps, eval_steps=-1, max_train_epoch=3)
    _nan_at_call(monkeypatch, 4)
    saved = {}
    real_save = training.save_checkpoint

    def save_checkpoint(path, state):
        real_save(path, state)
        with open(path, "rb") as f:
            saved[state["step"]] = hashlib.sha256(f.read()).hexdigest()
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)

    code, _, err = run_cli(capsys, "--do_train", "--from_scratch", "--config_model",
                           model_config(tmp_path), "--config_train", cfg,
                           "--output_dir", out)
    assert code == 2
    assert error_line(err) == (
        f"error: training stopped: the loss at step 4 is nan (not finite); nothing after "
        f"step {saved_step} was saved ({out / 'model.ckpt'} holds step {saved_step}). "
        f"Likely cause: a learning rate too high for this model (peak lr 0.003 in {cfg}): "
        f"lower it, lengthen warmup_steps or clip gradients (gradient_clip max_norm)")
    assert list(saved) == [saved_step]
    assert snapshot(out)["model.ckpt"] == saved[saved_step]
    state = load_ckpt(out / "model.ckpt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(np.isfinite(r["loss"]) for r in read_metrics(out))
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "model.ckpt"]


def test_diverging_run_exits_non_zero_on_the_command_line(tmp_path, data_dir):
    """A real divergence (SGD at lr 1e30) rather than an injected NaN."""
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir, checkpoint_steps=1, eval_steps=1,
                       opt={"optimizer": {"type": "SGD", "kwargs": {"lr": 1e30}}})
    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_train", "--quiet",
                           "--from_scratch", "--config_model", model_config(tmp_path),
                           "--config_train", cfg, "--output_dir", str(out)],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert line.startswith("error: training stopped: the ")
    assert "Likely cause: a learning rate too high for this model (peak lr 1e+30" in line
    assert "model_best.ckpt" not in os.listdir(out)  # a NaN dev perplexity is never best
    if (out / "model.ckpt").exists():
        state = load_ckpt(out / "model.ckpt")
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or n == ".lock"]


def test_ctrl_c_never_saves_non_finite_weights(tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir, display_steps=-1, checkpoint_steps=3,
                       eval_steps=-1, max_train_epoch=3)
    _nan_at_call(monkeypatch, 4)
    # Ctrl-C arrives during step 4, whose loss (and so whose update) is NaN.
    monkeypatch.setattr(training.Trainer, "_after_step_real", training.Trainer._after_step,
                        raising=False)

    def after_step(self, window, bar, stop, last_path):
        if self.step == 4:
            stop.requested = True
        return self._after_step_real(window, bar, stop, last_path)
    monkeypatch.setattr(training.Trainer, "_after_step", after_step)
    code, _, err = run_cli(capsys, "--do_train", "--from_scratch", "--config_model",
                           model_config(tmp_path), "--config_train", cfg,
                           "--output_dir", out)
    assert code == 2
    assert "the loss at step 4 is nan (not finite); nothing after step 3 was saved" in \
        error_line(err)
    assert load_ckpt(out / "model.ckpt")["step"] == 3


def test_non_finite_dev_perplexity_stops_training_and_is_never_the_best(
        tmp_path, data_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = train_config(tmp_path, data_dir, eval_steps=1)
    real = training.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:  # every later evaluation: an overflowing loss
            result.nll = float("inf")
        return result
    monkeypatch.setattr(training, "evaluate", evaluate)
    code, _, err = run_cli(capsys, "--do_train", "--from_scratch", "--config_model",
                           model_config(tmp_path), "--config_train", cfg,
                           "--output_dir", out, "--stop_after_steps", 3)
    assert code == 2
    assert error_line(err).startswith(
        "error: training stopped: the dev loss at step 2 is inf (not finite); nothing "
        "was saved. Likely cause: ")
    best = load_ckpt(out / "model_best.ckpt")
    assert best["step"] == 1 and np.isfinite(best["dev_perplexity"])
    assert not (out / "model.ckpt").exists()
    assert [r["step"] for r in read_metrics(out) if r["split"] == "dev"] == [1]


@pytest.mark.parametrize("opt,match", [
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": float("inf")}}},
     r"need a finite positive 'lr' \(got inf\)"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": float("nan")}}},
     r"need a finite positive 'lr' \(got nan\)"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 0}}}, "finite positive 'lr'"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": -1e-4}}}, "finite positive 'lr'"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": True}}}, "finite positive 'lr'"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4, "eps": float("nan")}}},
     "eps = nan is not a finite number"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4, "weight_decay": float("inf")}}},
     "weight_decay = inf is not a finite number"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4}},
      "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": float("nan")}}},
     "gradient_clip kwargs: max_norm = nan is not a finite number"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4}},
      "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": float("inf")}}},
     "max_norm = inf is not a finite number"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4}},
      "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 0.0}}},
     "max_norm = 0.0 must be positive"),
    ({"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4}},
      "gradient_clip": {"type": "clip_grad_value_", "kwargs": {"clip_value": -1.0}}},
     "clip_value = -1.0 must be positive"),
])
def test_non_finite_or_non_positive_rates_are_refused_when_read(tmp_path, data_dir, opt,
                                                                match):
    path = tmp_path / "cfg.py"
    path.write_text(open(train_config(tmp_path, data_dir)).read()
                    + f"opt = {opt!r}\n".replace("inf", "float('inf')")
                    .replace("nan", "float('nan')"))
    with pytest.raises(UserError, match=match):
        load_train_config(str(path))


def test_infinite_norm_type_is_still_allowed(tmp_path, data_dir):
    cfg = load_train_config(train_config(tmp_path, data_dir, opt={
        "optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-4}},
        "gradient_clip": {"type": "clip_grad_norm_",
                          "kwargs": {"max_norm": 1.0, "norm_type": 2.0}}}))
    assert cfg.opt["gradient_clip"]["kwargs"]["norm_type"] == 2.0
    path = tmp_path / "inf_norm.py"
    path.write_text(open(train_config(tmp_path, data_dir)).read() + (
        "opt = {'optimizer': {'type': 'AdamW', 'kwargs': {'lr': 1e-4}}, 'gradient_clip': "
        "{'type': 'clip_grad_norm_', 'kwargs': {'max_norm': 1.0, "
        "'norm_type': float('inf')}}}\n"))
    assert load_train_config(str(path)).opt["gradient_clip"]["kwargs"]["norm_type"] == \
        float("inf")


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("typo,right", [
    ("checkpoint_step", "checkpoint_steps"),
    ("train_batch_szie", "train_batch_size"),
    ("EVAL_STEPS", "eval_steps"),
    ("max_seq_lenght", "max_seq_length"),
])
def test_misspelt_config_names_suggest_the_right_one(tmp_path, data_dir, typo, right,
                                                     capsys):
    path = tmp_path / "typo.py"
    path.write_text(open(train_config(tmp_path, data_dir)).read() + f"{typo} = 5\n")
    code, _, err = run_cli(capsys, "--do_eval", "--from_scratch", "--config_model",
                           model_config(tmp_path), "--config_train", path)
    assert code == 2
    assert error_line(err) == (
        f"error: training config {path} sets {typo} (did you mean {right}?), which is "
        f"not a setting: fix the name (the settings are listed in configs/config_train.py)")


def test_helper_names_in_a_config_are_not_typos(tmp_path, data_dir):
    path = tmp_path / "helpers.py"
    path.write_text("import os\nimport math as m\nfrom os.path import join\n"
                    + open(train_config(tmp_path, data_dir)).read()
                    + "_max_seq_length_base = 24\n_base_lr = 3e-3\n_train_batch_szie = 4\n"
                      "def checkpoint_step(x):\n    return x\n"
                      "class Eval_Steps:\n    pass\n")
    assert load_train_config(str(path)).max_seq_length == 24


@pytest.mark.parametrize("body,match", [
    ("import sys\nsys.exit(3)\n", r"failed to load: it called exit\(3\); a config may "
                                  r"only set values"),
    ("raise SystemExit\n", r"it called exit\(None\)"),
    ("raise RuntimeError('boom')\n", "failed to load: RuntimeError: boom: fix the config"),
    ("x = 1 / 0\n", "ZeroDivisionError"),
])
def test_a_config_that_exits_or_raises_is_a_config_error(tmp_path, body, match):
    path = tmp_path / "bad_cfg.py"
    path.write_text(body)
    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_eval",
                           "--config_train", str(path)], cwd=REPO_ROOT, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # not the config's own exit code, and not 0
    line = error_line(proc.stderr)
    assert line.startswith(f"error: config file {path} failed to load: ")
    import re
    assert re.search(match, line), line


def test_a_config_module_that_exits_is_a_config_error(tmp_path, monkeypatch):
    package = tmp_path / "mycfgs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "exits.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"config 'mycfgs.exits' \(mycfgs.exits\) failed "
                                        r"to load: it called exit\(0\)"):
        load_train_config("mycfgs.exits")


def test_bare_config_names_are_found_in_configs():
    """The original example's `--config_train=config_train` restore command."""
    from utils.model import load_model_hparams
    cfg = load_train_config("config_train", {"max_seq_length": 128})
    assert cfg.data_dir == "data/toy" and cfg.name == "config_train"
    # Without a length, the shipped config takes prepare_data.py's record of it:
    # data/toy as shipped has none, which is one line saying what to run.
    with pytest.raises(UserError, match=r"leaves max_seq_length to the data, but "
                                        r"data/toy holds no prepared data: run "
                                        r"prepare_data.py"):
        load_train_config("config_train")
    assert load_model_hparams("config_model_tiny") == load_model_hparams(
        "configs.config_model_tiny")
    with pytest.raises(UserError, match=r"unknown config 'no_such_config' \(also tried "
                                        r"configs.no_such_config\)"):
        load_train_config("no_such_config")


# ------------------------------------------------------------------ paths, data, disk

@pytest.mark.parametrize("name,flags", [
    ("model.ckpt", ["--do_train"]),
    ("metrics.jsonl", ["--do_train"]),
    ("test_samples.tsv", ["--do_test"]),
])
def test_a_directory_where_an_output_file_goes(tmp_path, job, capsys, name, flags):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    code, _, err = run_cli(capsys, *flags, *job["common"], "--output_dir", out)
    assert code == 2
    assert error_line(err) == (
        f"error: {out / name} is a directory (or another non-file), but this run writes "
        f"its {name} there: move it away, or choose another --output_dir")
    assert os.listdir(out) == [name]


@pytest.mark.parametrize("split,bad_id", [("train", 50300), ("dev", 60000),
                                          ("train", -5)])
def test_token_ids_outside_the_vocabulary(tmp_path, job, data_dir, capsys, split, bad_id):
    from utils.processor import EOS_ID
    sequences = [[EOS_ID, 10, 11, EOS_ID], [EOS_ID, 12, EOS_ID],
                 [EOS_ID, 13, 14, bad_id, EOS_ID]]
    _write_split(data_dir / f"{split}.npy", sequences, 24)
    if bad_id < 0:  # int32 records, as for vocabularies beyond 65536
        from utils.data.records import record_dtype
        rec = np.zeros(3, dtype=record_dtype(24, 70000))
        for i, seq in enumerate(sequences):
            rec["length"][i] = len(seq)
            rec["text_ids"][i, :len(seq)] = seq
        np.save(data_dir / f"{split}.npy", rec, allow_pickle=False)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--do_train", "--do_eval", *job["common"],
                           "--output_dir", out)
    assert code == 2
    assert error_line(err) == (
        f"error: the {split} split {data_dir / (split + '.npy')} holds token id {bad_id} "
        f"(example 2 counting from 0, position 3), outside the model's vocabulary of "
        f"50257 ids (0 to 50256): prepare the data with the model's vocabulary, or use a "
        f"model whose n_vocab covers it")
    assert os.listdir(out) == []  # refused before any training step


def test_full_disk_while_saving_a_checkpoint(tmp_path, job, monkeypatch, capsys):
    out = tmp_path / "out"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"a first part")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run_cli(capsys, "--do_train", *job["common"], "--output_dir", out,
                           "--stop_after_steps", 1)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2
    assert error_line(err) == (f"error: no space left on device while writing "
                               f"{out / 'model_best.ckpt'}: free disk space, then run again")
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]  # no partial file, no lock
