"""utils/training/config.py: reading a training config, and every check of its values."""
import pytest
import torch

from test_train import data_dir, train, train_config  # noqa: F401

from utils.errors import UserError
from utils.training.config import check_precision, load_train_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("overrides,match", [
    ({"precision": "fp8"}, "precision"),
    ({"train_batch_size": 0}, "train_batch_size"),
    ({"lr_decay": "step"}, "lr_decay"),
    ({"opt": {"optimizer": {"type": "AdamW", "kwargs": {}}}}, "lr"),
    ({"opt": {"learning_rate_decay": {"type": "ExponentialLR",
                                      "kwargs": {"gamma": 0.9}}}}, "warmup_steps"),
    ({"opt": {"optimiser": {}}}, "not valid texar"),
    ({"opt": {"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3, "betas": (0.9, 2.0)}}}},
     "cannot be used: Invalid beta"),
    ({"opt": {"optimizer": {"type": "NoSuchOpt", "kwargs": {"lr": 1e-3}}}}, "cannot be used"),
    ({"opt": {"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-3, "bogus": 1}}}},
     "cannot be used: .*bogus"),
    ({"seed": -5}, "seed"),
    ({"seed": 2 ** 70}, "seed"),
])
def test_bad_config_values_are_errors(tmp_path, data_dir, overrides, match):
    with pytest.raises(UserError, match=match):
        load_train_config(train_config(tmp_path, data_dir, **overrides))


def test_config_missing_fields_and_unknown_config(tmp_path):
    path = tmp_path / "partial.py"
    path.write_text("data_dir = 'x'\n")
    with pytest.raises(UserError, match="lacks train_batch_size, .*--set key=value"):
        load_train_config(str(path))
    with pytest.raises(UserError, match="unknown config"):
        train("--do_eval", "--config_train", "configs.no_such_config")


def test_original_config_field_names_are_accepted(tmp_path, data_dir):
    path = tmp_path / "orig.py"
    path.write_text(f"tfrecord_data_dir = {str(data_dir)!r}\nmax_seq_length = 24\n"
                    "train_batch_size = 2\neval_batch_size = 2\ntest_batch_size = 2\n"
                    "max_train_epoch = 1\ndisplay_steps = 1\neval_steps = -1\n"
                    "opt = {'optimizer': {'type': 'Adam', 'kwargs': {'lr': 0.001}}}\n")
    cfg = load_train_config(str(path))
    assert cfg.data_dir == str(data_dir) and cfg.max_decoding_length == 24


def test_fp16_on_cpu_is_an_error():
    with pytest.raises(UserError, match="fp16.*CUDA"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("overrides, less_memory", [
    ({}, False),
    ({"gradient_checkpointing": True}, True),
    ({"trainable": "transformer"}, True),
    ({"lora": {"rank": 4}}, True),
    ({"shard_model": True}, True),
])
def test_only_a_memory_option_maps_large_blocks_separately(tmp_path, data_dir, monkeypatch,
                                                           overrides, less_memory):
    """glibc's fixed mmap threshold saves memory but costs a default fine-tune
    10-17% of its speed (benchmarks/README.md): gpt2_train_main sets it only
    when the config asks for less memory."""
    import gpt2_train_main
    cfg = load_train_config(train_config(tmp_path, data_dir), overrides)
    assert cfg.asks_for_less_memory() is less_memory
    calls = []
    monkeypatch.setattr(gpt2_train_main, "map_large_blocks_separately",
                        lambda: calls.append(1) or True)
    stop = UserError("stopped after the config")
    monkeypatch.setattr(gpt2_train_main, "open_splits",
                        lambda *a, **k: (_ for _ in ()).throw(stop))
    args = ["--config_train", train_config(tmp_path, data_dir), "--do_train",
            "--output_dir", str(tmp_path / "out")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value!r}" if not isinstance(value, str) else f"{key}={value}"]
    with pytest.raises(UserError, match="stopped after the config"):
        gpt2_train_main.main(args)
    assert calls == ([1] if less_memory else [])
