"""Weights are checked in one place (utils/checkpoints/weight_checks.py) that generate,
train and convert all use: what one command refuses, none accepts (issue 19,
items 3 and 4)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_checkpoint
import gpt2_generate_main
from user_files import assert_one_line_error, run_in_process, snapshot, tiny_models

GREEDY = ["--decoding_strategy", "greedy", "--max_decoding_length", "8", "--prompt", "hi"]
TENSOR = "decoder.self_attns.0.O_dense.bias"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("models")))


def edited_ckpt(ckpt, path, edit):
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, path)
    return str(path)


def both_refuse(model_flags, src, tmp_path, monkeypatch, capsys, *needles):
    """generate and convert (to each format) refuse with the same line; inputs unchanged."""
    watched = [p for p in (src,) if os.path.exists(p)]
    before = snapshot(*watched)
    lines = []
    code, _, err = run_in_process(gpt2_generate_main.main, [*model_flags, *GREEDY],
                                  monkeypatch, capsys)
    lines.append(assert_one_line_error(code, err, *needles))
    for fmt in ("ckpt", "hf", "openai"):
        out = tmp_path / f"out_{fmt}"
        code, _, err = run_in_process(convert_checkpoint.main, [src, out, "--format", fmt],
                                      monkeypatch, capsys)
        lines.append(assert_one_line_error(code, err, *needles))
        assert not os.path.exists(out)
    assert snapshot(*watched) == before
    return lines


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool])
def test_integer_weights_in_a_ckpt_are_refused_everywhere(dtype, models, tmp_path,
                                                          monkeypatch, capsys):
    ckpt, _ = models
    bad = edited_ckpt(ckpt, tmp_path / "bad.ckpt", lambda s: s["model"].__setitem__(
        TENSOR, s["model"][TENSOR].to(dtype)))
    lines = both_refuse(["--checkpoint", bad], bad, tmp_path, monkeypatch, capsys,
                        bad, TENSOR, str(dtype).replace("torch.", ""))
    assert len(set(lines)) == 1, lines  # the very same message from every command


def test_integer_weights_in_safetensors_are_refused_everywhere(models, tmp_path,
                                                              monkeypatch, capsys):
    _, hf = models
    model = tmp_path / "hf"
    shutil.copytree(hf, model)
    weights = str(model / "model.safetensors")
    tensors = load_file(weights)
    name = "transformer.h.0.attn.c_proj.bias"
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, weights, metadata={"format": "pt"})
    both_refuse(["--pretrain_model_dir", model], str(model), tmp_path, monkeypatch, capsys,
                weights, name, "int8")


def test_ckpt_with_more_layers_than_it_declares(models, tmp_path, monkeypatch, capsys):
    """n_layer=1 in model_sizes, two layers of tensors: refused by all, not cut."""
    ckpt, _ = models
    bad = edited_ckpt(ckpt, tmp_path / "bad.ckpt",
                      lambda s: s["model_sizes"].__setitem__("n_layer", 1))
    lines = both_refuse(["--checkpoint", bad], bad, tmp_path, monkeypatch, capsys,
                        bad, "does not fit the model sizes it declares", "unexpected",
                        "decoder.poswise_layer_norm.1.bias")
    assert len(set(lines)) == 1, lines


def test_extra_and_cross_attention_tensors_without_memory(models, tmp_path, monkeypatch,
                                                          capsys):
    ckpt, _ = models

    def add(state):
        state["model"]["decoder.enc_dec_attns.0.Q_dense.weight"] = torch.zeros(8, 8)
        state["model"]["extra.weight"] = torch.zeros(3)
    bad = edited_ckpt(ckpt, tmp_path / "bad.ckpt", add)
    both_refuse(["--checkpoint", bad], bad, tmp_path, monkeypatch, capsys,
                "unexpected", "enc_dec_attns.0.Q_dense.weight", "extra.weight")


def test_nan_weights_are_refused_by_convert_too(models, tmp_path, monkeypatch, capsys):
    ckpt, hf = models

    def poison(state):
        state["model"][TENSOR] = torch.full_like(state["model"][TENSOR], float("nan"))
    bad = edited_ckpt(ckpt, tmp_path / "nan.ckpt", poison)
    both_refuse(["--checkpoint", bad], bad, tmp_path, monkeypatch, capsys,
                "non-finite weights", TENSOR)
    model = tmp_path / "hf"
    shutil.copytree(hf, model)
    weights = str(model / "model.safetensors")
    tensors = load_file(weights)
    tensors["transformer.ln_f.weight"][0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    code, _, err = run_in_process(convert_checkpoint.main, [model, tmp_path / "o",
                                                            "--format", "ckpt"],
                                  monkeypatch, capsys)
    assert_one_line_error(code, err, "non-finite", "transformer.ln_f.weight")
