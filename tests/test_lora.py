"""LoRA (utils/lora.py, `lora` in the training config): adapters only train, the
merged weights give the adapted model's outputs (checked against Hugging Face
peft's LoRA on the same texar layers), exact resume (with gradient
checkpointing switched on half-way), generation, export read by transformers,
DDP, and the refusals.

The base model is a tiny GPT-2 (width 16, 2 layers) saved as our .ckpt, so
every run takes a second or two.
"""
import os
import sys

import pytest
import torch

import convert_checkpoint
import gpt2_generate_main
import gpt2_train_main
from tests.test_train import SUBPROCESS_ENV, data_dir, train_config  # noqa: F401

from utils import lora
from utils.checkpoints.weights import (CHECKPOINT_FORMAT, checkpoint_model_fields,
                                       load_weights, resolve_model, save_checkpoint)
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams
from utils.training.config import load_train_config
import script_server

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["attention", "mlp"]}
HPARAMS = gpt2_hparams(50257, 32, 16, 2, 2)
# Gradient magnitudes here reach ~1: a sum over n terms in float32 is exact to
# about n * 2**-24 relative; 1e-6 leaves room for a different summation order.
FP32_TOL = 1e-6


def save_base(path, seed=0):
    torch.manual_seed(seed)
    model = build_model(HPARAMS)
    save_checkpoint(str(path), {"model": model.state_dict(), "format": CHECKPOINT_FORMAT,
                                **checkpoint_model_fields(HPARAMS)})
    return str(path)


@pytest.fixture
def base(tmp_path):
    return save_base(tmp_path / "base.ckpt")


def lora_config(tmp_path, data, name="lora_cfg", **overrides):
    settings = dict(lora=LORA, eval_steps=-1, opt={"optimizer": {"type": "AdamW",
                                                                 "kwargs": {"lr": 2e-2}}})
    settings.update(overrides)
    return train_config(tmp_path, data, name=name, **settings)


def train(*args):
    return gpt2_train_main.main(["--quiet", *map(str, args)])


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def random_adapters(model, settings, seed=1):
    """Adapters with B non-zero too (a fresh B is zero: no update to test)."""
    torch.manual_seed(seed)
    lora.add_adapters(model, settings)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lora.LoraAdapter):
                module.B.normal_(0, 0.5)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.full((ids.size(0),), ids.size(1))).logits


# ------------------------------------------------------------------ the arithmetic

def test_rank_r_update_equals_the_merged_weights_and_peft():
    settings = lora.lora_settings(LORA, "test")
    torch.manual_seed(0)
    model = build_model(HPARAMS).eval()
    ids = torch.randint(0, 50257, (2, 9))
    base_out = logits(model, ids)
    random_adapters(model, settings)
    adapted = logits(model, ids)
    assert (adapted - base_out).abs().max() > 1e-2  # the adapters do something

    # peft's LoRA (an implementation we did not write) on the same layers.
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    reference = build_model(HPARAMS).eval()
    names = [name for name, _ in lora.target_layers(reference, settings.targets)]
    reference = peft.inject_adapter_in_model(
        peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                        target_modules=names), reference)
    ours = dict(lora.target_layers(model, settings.targets))
    with torch.no_grad():
        for name in names:
            wrapped = reference.get_submodule(name)
            wrapped.lora_A["default"].weight.copy_(ours[name].lora.A)
            wrapped.lora_B["default"].weight.copy_(ours[name].lora.B)
    torch.testing.assert_close(logits(reference, ids), adapted, rtol=FP32_TOL, atol=1e-5)

    lora.merge_adapters(model)
    assert not lora.has_adapters(model)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=FP32_TOL, atol=1e-5)


def test_merged_view_restores_base_weights_exactly():
    settings = lora.lora_settings(LORA, "test")
    model = build_model(HPARAMS)
    random_adapters(model, settings)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50257, (1, 5))
    adapted = logits(model, ids)
    with lora.merged_view(model):
        torch.testing.assert_close(logits(model, ids), adapted, rtol=FP32_TOL, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, ids), adapted)  # the hooks run again


@pytest.mark.parametrize("value,message", [
    ({"rank": 0}, "rank = 0"),
    ({"rank": 4, "alpha": -1}, "alpha = -1"),
    ({"dropout": 1.0}, "dropout = 1.0"),
    ({"targets": ["attention", "embeddings"]}, "targets"),
    ({"targets": "mlp"}, "targets"),
    ({"rank": 4, "rnak": 8}, "unknown entries rnak"),
    ([8, 16], "must be a dict"),
])
def test_bad_lora_settings_are_refused_in_one_line(tmp_path, data_dir, value, message):
    with pytest.raises(UserError) as err:
        load_train_config(lora_config(tmp_path, data_dir, lora=value))
    assert message in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ training

def test_only_adapters_change_and_the_checkpoint_names_its_base(tmp_path, data_dir, base):
    out = tmp_path / "out"
    assert train("--do_train", "--checkpoint", base, "--config_train",
                 lora_config(tmp_path, data_dir), "--output_dir", out) == 0
    state = load(out / "model.ckpt")
    assert "model" not in state and state["lora"] == dict(LORA, alpha=8.0)
    assert state["lora_base"]["kind"] == "checkpoint"
    assert state["lora_base"]["path"] == os.path.abspath(base)
    adapters = state["lora_adapters"]
    # 2 blocks x (4 attention + 2 feed-forward layers) x (A, B)
    assert len(adapters) == 24 and all(lora.ADAPTER_MARK in k for k in adapters)
    assert os.path.getsize(out / "model.ckpt") < os.path.getsize(base) / 10

    # Merged: every base tensor the same except the adapted weights, which
    # moved by exactly scale * B A (the rank-r update).
    merged = tmp_path / "merged.ckpt"
    assert convert_checkpoint.main([str(out / "model.ckpt"), str(merged), "--format",
                                    "ckpt", "--merge_lora"]) == 0
    before, after = load(base)["model"], load(merged)["model"]
    assert set(before) == set(after)
    scale = LORA["alpha"] / LORA["rank"]
    changed = set()
    for name in before:
        layer = name[:-len(".weight")]
        if layer + ".lora.A" in adapters:
            delta = scale * adapters[layer + ".lora.B"] @ adapters[layer + ".lora.A"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(after[name], before[name] + delta, rtol=0, atol=1e-6)
            changed.add(name)
        else:
            assert torch.equal(after[name], before[name]), name
    assert len(changed) == 12


def test_resume_is_exact_and_composes_with_gradient_checkpointing(tmp_path, data_dir, base):
    whole, first, second = tmp_path / "whole", tmp_path / "part", tmp_path / "part"
    cfg = lora_config(tmp_path, data_dir)
    assert train("--do_train", "--checkpoint", base, "--config_train", cfg,
                 "--output_dir", whole) == 0
    assert train("--do_train", "--checkpoint", base, "--config_train", cfg,
                 "--output_dir", first, "--stop_after_steps", 2) == 0
    assert load(first / "model.ckpt")["step"] == 2
    # The rest with gradient checkpointing: the same gradients, so the same adapters.
    cfg_gc = lora_config(tmp_path, data_dir, name="lora_gc", gradient_checkpointing=True)
    assert train("--do_train", "--checkpoint", first / "model.ckpt", "--config_train",
                 cfg_gc, "--output_dir", second) == 0
    a, b = load(whole / "model.ckpt"), load(second / "model.ckpt")
    assert a["step"] == b["step"] == 6
    for name, tensor in a["lora_adapters"].items():
        torch.testing.assert_close(b["lora_adapters"][name], tensor, rtol=FP32_TOL, atol=1e-7)


def test_resume_refuses_other_adapters_or_no_lora(tmp_path, data_dir, base):
    out = tmp_path / "out"
    assert train("--do_train", "--checkpoint", base, "--config_train",
                 lora_config(tmp_path, data_dir), "--output_dir", out,
                 "--stop_after_steps", 1) == 0
    ckpt = out / "model.ckpt"
    other_rank = lora_config(tmp_path, data_dir, name="r8", lora=dict(LORA, rank=8))
    with pytest.raises(UserError, match="rank 4 but the training config's lora sets rank 8"):
        train("--do_train", "--checkpoint", ckpt, "--config_train", other_rank,
              "--output_dir", out)
    no_lora = train_config(tmp_path, data_dir, name="full")
    with pytest.raises(UserError, match="holds LoRA adapters but the training config has no lora"):
        train("--do_train", "--checkpoint", ckpt, "--config_train", no_lora,
              "--output_dir", out)
    with pytest.raises(UserError, match="--from_scratch gives random ones"):
        train("--do_train", "--from_scratch", "--config_model", _model_cfg(tmp_path),
              "--config_train", lora_config(tmp_path, data_dir), "--output_dir",
              tmp_path / "scratch")


def _model_cfg(tmp_path):
    path = tmp_path / "model_cfg.py"
    path.write_text("from utils.model import gpt2_hparams\n"
                    "hparams = gpt2_hparams(50257, 32, 16, 2, 2)\n")
    return str(path)


# ------------------------------------------------------------------ other commands

@pytest.fixture
def trained(tmp_path, data_dir, base):
    out = tmp_path / "out"
    assert train("--do_train", "--checkpoint", base, "--config_train",
                 lora_config(tmp_path, data_dir), "--output_dir", out) == 0
    return out / "model.ckpt"


def test_generate_applies_the_adapters_and_refuses_a_wrong_base(tmp_path, trained, base,
                                                                capsys):
    merged = tmp_path / "merged.ckpt"
    assert convert_checkpoint.main([str(trained), str(merged), "--format", "ckpt",
                                    "--merge_lora"]) == 0
    loaded = load_weights(resolve_model(checkpoint=str(trained)))
    assert not lora.has_adapters(loaded.model)  # merged for the decoding engine
    for name, tensor in load(merged)["model"].items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name

    def greedy(ckpt):
        capsys.readouterr()
        assert gpt2_generate_main.main(["--checkpoint", str(ckpt), "--prompt", "The bakery",
                                        "--decoding_strategy", "greedy",
                                        "--max_decoding_length", "12"]) == 0
        return capsys.readouterr().out
    with_adapters = greedy(trained)
    assert with_adapters == greedy(merged) and "The bakery" in with_adapters
    assert with_adapters != greedy(base)  # the adapters changed the text

    other = save_base(tmp_path / "other.ckpt", seed=5)
    with pytest.raises(UserError, match="trained on other base weights"):
        load_weights(resolve_model(checkpoint=str(trained), lora_base=other))
    os.replace(base, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match="is not there: give it with --pretrain_model_dir"):
        resolve_model(checkpoint=str(trained))
    moved = load_weights(resolve_model(checkpoint=str(trained),
                                       lora_base=str(tmp_path / "moved.ckpt")))
    assert torch.equal(moved.model.decoder.self_attns[0].Q_dense.weight,
                       loaded.model.decoder.self_attns[0].Q_dense.weight)


def test_convert_needs_merge_lora_and_refuses_it_for_a_whole_model(tmp_path, trained, base):
    with pytest.raises(UserError, match="pass --merge_lora"):
        convert_checkpoint.main([str(trained), str(tmp_path / "x"), "--format", "hf"])
    with pytest.raises(UserError, match="holds no LoRA adapters"):
        convert_checkpoint.main([base, str(tmp_path / "y"), "--format", "hf",
                                 "--merge_lora"])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_merged_export_opens_in_transformers_with_our_greedy_text(tmp_path, trained):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    assert convert_checkpoint.main([str(trained), str(hf_dir), "--format", "hf",
                                    "--merge_lora"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    prompt = tokenizer("The bakery", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=10, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)[0].tolist()

    from utils.decoding.generation import generate
    ours = load_weights(resolve_model(checkpoint=str(trained))).model
    new = generate(ours, [prompt[0].tolist()], prompt.size(1) + 10, strategy="greedy")[0]
    assert new and new == expected[prompt.size(1):][:len(new)]


# ------------------------------------------------------------------ DDP

def test_two_ddp_ranks_train_the_adapters_of_one_process(tmp_path, data_dir, base):
    """2 ranks x batch 2 under torchrun against 1 process x batch 4 (same
    global batch): the same adapters (float rounding of the gradient sum)."""
    one, two = tmp_path / "one", tmp_path / "two"
    cfg_one = lora_config(tmp_path, data_dir, name="one", train_batch_size=4,
                          max_train_epoch=1)
    cfg_two = lora_config(tmp_path, data_dir, name="two", train_batch_size=2,
                          max_train_epoch=1)
    assert train("--do_train", "--checkpoint", base, "--config_train", cfg_one,
                 "--output_dir", one) == 0
    proc = script_server.run(
        script_server.torchrun_command(2, "gpt2_train_main.py", "--do_train", "--distributed",
                                       "--quiet", "--checkpoint", base, "--config_train",
                                       cfg_two, "--output_dir", two),
        cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a, b = load(one / "model.ckpt"), load(two / "model.ckpt")
    assert a["step"] == b["step"] == 3 and b["data"]["world_size"] == 2
    for name, tensor in a["lora_adapters"].items():
        torch.testing.assert_close(b["lora_adapters"][name], tensor, rtol=1e-4, atol=1e-5)
