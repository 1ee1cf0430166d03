"""The memory options of config_train (gradient_checkpointing, trainable, a
factored optimizer), --device, and tensorboard_dir.

References: texar's own (un-checkpointed) block loop for the gradients, an
uninterrupted run for every resumed one, the initial weights for frozen ones.
"""
import importlib.util
import subprocess
import sys

import pytest
import torch

import gpt2_train_main
from utils.device import resolve_device
from utils.errors import UserError
from utils.training.lm import lm_nll
from utils.training.memory_options import (apply_memory_options, enable_gradient_checkpointing)
from utils.model import build_model, gpt2_hparams
from tests.test_train import (REPO_ROOT, SUBPROCESS_ENV, data_dir, load_ckpt,  # noqa: F401
                              model_config, read_metrics, train, train_config)
import script_server

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ADAFACTOR = {"optimizer": {"type": "Adafactor", "kwargs": {"lr": 1e-2}},
             "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 1.0}}}
EMBEDDINGS = ("word_embedder._embedding", "position_embedder._embedding")


def gradient_checkpointing_enabled(model) -> bool:
    """Whether utils/training/memory_options.py replaced the decoder's layer stack."""
    return "_self_attention_stack" in vars(model.decoder)


def tiny_model(dropout=0.1, n_vocab=50257):
    torch.manual_seed(0)  # every call: the same weights
    model = build_model(gpt2_hparams(n_vocab, 32, 16, 2, 3, dropout=dropout))
    return model.train()


def gradients(model, ids, lengths):
    torch.manual_seed(5)  # the same dropout masks
    nll, _ = lm_nll(model, ids, lengths)
    nll.backward()
    return nll.detach(), {n: p.grad for n, p in model.named_parameters()}


# ------------------------------------------------------------------ checkpointing

def test_checkpointed_gradients_equal_texars_block_loop_bit_for_bit():
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([20, 14, 2])
    plain = tiny_model()
    checkpointed = tiny_model()
    enable_gradient_checkpointing(checkpointed)
    assert gradient_checkpointing_enabled(checkpointed)
    assert not gradient_checkpointing_enabled(plain)
    loss_a, grads_a = gradients(plain, ids, lengths)
    loss_b, grads_b = gradients(checkpointed, ids, lengths)
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == 2 + 2 + 3 * 16 and grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None and torch.equal(grad, grads_b[name]), name


def test_checkpointing_keeps_fewer_tensors_for_backward():
    """What it promises for memory: the saved activations shrink (a small
    vocabulary, so that the logits, saved either way, do not dominate)."""
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([30, 30])

    def saved_bytes(model):
        total = []

        def pack(tensor):
            total.append(tensor.numel() * tensor.element_size())
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_nll(model, ids, lengths)
        return sum(total)

    checkpointed = tiny_model(n_vocab=64)
    enable_gradient_checkpointing(checkpointed)
    assert saved_bytes(checkpointed) < 0.5 * saved_bytes(tiny_model(n_vocab=64))


def test_evaluation_and_generation_take_texars_path():
    model = tiny_model(dropout=0.0)
    enable_gradient_checkpointing(model)
    ids = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        eval_logits = model(inputs=ids, decoding_strategy="train_greedy").logits
    model.eval()
    plain = tiny_model(dropout=0.0).eval()
    with torch.no_grad():
        assert torch.equal(eval_logits, plain(inputs=ids, decoding_strategy="train_greedy").logits)
        out_a = model(context=ids, context_sequence_length=torch.tensor([8]),
                      max_decoding_length=12, decoding_strategy="infer_greedy",
                      end_token=50256)
        out_b = plain(context=ids, context_sequence_length=torch.tensor([8]),
                      max_decoding_length=12, decoding_strategy="infer_greedy",
                      end_token=50256)
    assert torch.equal(out_a[0].sample_id, out_b[0].sample_id)


def test_checkpointed_run_resumes_exactly_and_equals_a_plain_run(tmp_path, data_dir):
    """With dropout: interrupted at step 4 and resumed, with checkpointing on,
    ends bit-identical to an uninterrupted run without it."""
    model_cfg = model_config(tmp_path, dropout=0.1)
    plain = train_config(tmp_path, data_dir, name="plain")
    ckpt = train_config(tmp_path, data_dir, name="ckpt", gradient_checkpointing=True)
    a, b = tmp_path / "a", tmp_path / "b"
    train("--do_train", "--from_scratch", "--config_model", model_cfg,
          "--config_train", plain, "--output_dir", a)
    train("--do_train", "--from_scratch", "--config_model", model_cfg,
          "--config_train", ckpt, "--output_dir", b, "--stop_after_steps", 4)
    train("--do_train", "--checkpoint", b / "model.ckpt", "--config_train", ckpt,
          "--output_dir", b)
    assert read_metrics(a) == read_metrics(b)
    assert_same_state(load_ckpt(a / "model.ckpt"), load_ckpt(b / "model.ckpt"))


def assert_same_state(state_a, state_b):
    assert state_a["step"] == state_b["step"] == 6
    for name, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][name]), name
    assert state_a["optimizer"]["state"].keys() == state_b["optimizer"]["state"].keys()
    for key, value in state_a["optimizer"]["state"].items():
        for field, tensor in value.items():
            other = state_b["optimizer"]["state"][key][field]
            assert (torch.equal(tensor, other) if isinstance(tensor, torch.Tensor)
                    else tensor == other), (key, field)


# ------------------------------------------------------------------ factored optimizer, frozen embeddings

@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch < 2.5")
def test_adafactor_with_frozen_embeddings_resumes_exactly(tmp_path, data_dir):
    model_cfg = model_config(tmp_path, dropout=0.1)
    cfg = train_config(tmp_path, data_dir, opt=ADAFACTOR, trainable="transformer")
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--from_scratch", "--config_model", model_cfg, "--config_train", cfg]
    train("--do_train", *common, "--output_dir", a)
    train("--do_train", *common, "--output_dir", b, "--stop_after_steps", 4)
    train("--do_train", "--checkpoint", b / "model.ckpt", "--config_train", cfg,
          "--output_dir", b)
    assert read_metrics(a) == read_metrics(b)
    state_a, state_b = load_ckpt(a / "model.ckpt"), load_ckpt(b / "model.ckpt")
    assert state_a["optimizer_type"] == "Adafactor"
    assert_same_state(state_a, state_b)
    # Factored: a weight matrix keeps a row and a column vector, no full second moment.
    shapes = [tuple(t.shape) for s in state_a["optimizer"]["state"].values()
              for t in s.values() if isinstance(t, torch.Tensor) and t.dim() >= 1]
    assert max(torch.Size(s).numel() for s in shapes) <= 4 * 16  # the 4x feed-forward width
    losses = [r["loss"] for r in read_metrics(a) if r["split"] == "train"]
    assert losses[-1] < losses[0]


def test_frozen_embeddings_stay_bit_identical_and_get_no_optimizer_state(tmp_path, data_dir):
    model_cfg = model_config(tmp_path)
    out, frozen = tmp_path / "out", tmp_path / "frozen"
    cfg = train_config(tmp_path, data_dir, name="frozen", trainable="transformer")
    train("--do_train", "--from_scratch", "--config_model", model_cfg,
          "--config_train", cfg, "--output_dir", frozen)
    torch.manual_seed(3)  # the config's seed, as gpt2_train_main seeds --from_scratch
    initial = build_model(gpt2_hparams(50257, 32, 16, 2, 2)).state_dict()
    trained = load_ckpt(frozen / "model.ckpt")
    unchanged = {n for n in initial if torch.equal(trained["model"][n], initial[n])}
    # The output layer is the token embedding (a second name in the state dict).
    output_layer = [n for n in initial if "output_layer" in n]
    assert len(output_layer) == 1
    assert unchanged == {*EMBEDDINGS, *output_layer}
    # AdamW state for every trainable tensor and none for the two embeddings.
    model = build_model(gpt2_hparams(50257, 32, 16, 2, 2))
    apply_memory_options(model, False, "transformer")
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert trainable == len(list(model.parameters())) - 2
    assert len(trained["optimizer"]["state"]) == trainable
    # Resuming with the embeddings trainable again is a one-line error.
    with pytest.raises(UserError, match="does not fit the optimizer"):
        train("--do_train", "--checkpoint", frozen / "model.ckpt", "--config_train",
              train_config(tmp_path, data_dir, name="all", max_train_epoch=3),
              "--output_dir", out)


# ------------------------------------------------------------------ bad values

@pytest.mark.parametrize("setting, value, message", [
    ("gradient_checkpointing", "yes", "gradient_checkpointing = 'yes' .* must be True or False"),
    ("trainable", "embeddings", "trainable = 'embeddings' .* must be one of 'all', "
                                "'transformer'"),
    ("tensorboard_dir", "", "tensorboard_dir = '' .* must be a directory path"),
    ("gradient_checkpointng", True, "did you mean gradient_checkpointing"),
])
def test_bad_option_values_are_one_line_errors(tmp_path, data_dir, setting, value, message):
    cfg = train_config(tmp_path, data_dir, **{setting: value})
    with pytest.raises(UserError, match=message) as err:
        train("--do_train", "--from_scratch", "--config_train", cfg)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed: the missing-package path cannot run")
def test_tensorboard_dir_without_the_package_says_how_to_install(tmp_path, data_dir):
    cfg = train_config(tmp_path, data_dir, tensorboard_dir=str(tmp_path / "tb"))
    proc = script_server.run([sys.executable, "gpt2_train_main.py", "--do_train",
                           "--from_scratch", "--config_train", cfg,
                           "--output_dir", str(tmp_path / "out")],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: tensorboard_dir in training config")
    assert "pip install tensorboard" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ --device

def test_auto_device_is_the_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [
    ("cuda", "--device cuda: no CUDA GPU is available"),
    ("cuda:1", "--device cuda:1: no CUDA GPU is available"),
    ("mps", "--device mps: this machine has no Apple MPS device"),
    ("tpu", "'tpu' is not a device: use one of auto, cpu, cuda, cuda:N, mps"),
    ("cuda:x", "'cuda:x' is not a device"),
])
def test_absent_or_unknown_device_is_a_one_line_error(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("script", ["gpt2_train_main.py", "gpt2_generate_main.py"])
def test_scripts_refuse_an_absent_gpu_before_loading(tmp_path, script):
    args = ["--do_eval"] if script == "gpt2_train_main.py" else []
    proc = subprocess.run([sys.executable, script, *args, "--device", "cuda",
                           "--pretrain_model_dir", str(tmp_path / "none")],
                          cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --device cuda: no CUDA GPU is available (or this PyTorch was built "
        "without CUDA): use --device cpu or auto")


def test_device_cpu_trains_and_distributed_refuses_one_gpu_index(tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    train("--do_train", "--from_scratch", "--device", "cpu", "--stop_after_steps", 1,
          "--config_model", model_config(tmp_path),
          "--config_train", train_config(tmp_path, data_dir), "--output_dir", out)
    assert "on cpu" in capsys.readouterr().err
    with pytest.raises(UserError, match="--device cuda:0 with --distributed: each rank"):
        gpt2_train_main.check_args(gpt2_train_main.parse_args(
            ["--do_train", "--distributed", "--device", "cuda:0"]))


def test_tensorboard_scalars_mirror_metrics_jsonl(tmp_path, data_dir, monkeypatch):
    """Our side of the TensorBoard log, with a stand-in SummaryWriter (the
    package is optional): every number of metrics.jsonl as '<split>/<name>'
    at its step, and a resumed run purges the events after its checkpoint."""
    import utils.training.metrics_log as metrics_log
    writers = []

    class FakeWriter:
        def __init__(self, log_dir, resume_step):
            self.log_dir, self.resume_step, self.scalars = log_dir, resume_step, []
            self.closed = False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(metrics_log, "check_tensorboard_installed", lambda setting: None)
    monkeypatch.setattr(metrics_log, "_summary_writer", FakeWriter)
    import utils.training.config
    monkeypatch.setattr(utils.training.config, "check_tensorboard_installed", lambda s: None)
    cfg = train_config(tmp_path, data_dir, tensorboard_dir=str(tmp_path / "tb"))
    out = tmp_path / "out"
    common = ["--from_scratch", "--config_model", model_config(tmp_path), "--config_train", cfg]
    train("--do_train", *common, "--output_dir", out, "--stop_after_steps", 4)
    train("--do_train", "--checkpoint", out / "model.ckpt", "--config_train", cfg,
          "--output_dir", out)
    first, resumed = writers
    assert (first.resume_step, resumed.resume_step) == (None, 4)
    assert first.closed and resumed.closed and first.log_dir == str(tmp_path / "tb")
    expected = [(f"{r['split']}/{k}", v, r["step"]) for r in read_metrics(out)
                for k, v in r.items() if k not in ("split", "step")]
    logged = [s for s in first.scalars + resumed.scalars if not s[0].endswith("tokens_per_s")]
    assert logged == expected
