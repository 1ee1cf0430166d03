"""The model configs build texar GPT2Decoders with exactly OpenAI's parameter shapes."""
import math

import pytest

from utils.errors import UserError
from utils.model import (build_model, check_sizes_agree, count_parameters,
                         hparams_from_openai, load_model_hparams, model_size)


def openai_124M_shapes():
    """Shapes of every variable in OpenAI's 124M checkpoint, by layer role."""
    n_vocab, n_ctx, d = 50257, 1024, 768
    shapes = {"model/wte": (n_vocab, d), "model/wpe": (n_ctx, d),
              "model/ln_f/g": (d,), "model/ln_f/b": (d,)}
    for i in range(12):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": (d,), p + "ln_1/b": (d,),
            p + "attn/c_attn/w": (1, d, 3 * d), p + "attn/c_attn/b": (3 * d,),
            p + "attn/c_proj/w": (1, d, d), p + "attn/c_proj/b": (d,),
            p + "ln_2/g": (d,), p + "ln_2/b": (d,),
            p + "mlp/c_fc/w": (1, d, 4 * d), p + "mlp/c_fc/b": (4 * d,),
            p + "mlp/c_proj/w": (1, 4 * d, d), p + "mlp/c_proj/b": (d,),
        })
    return shapes


def test_117M_has_exactly_openai_124M_parameter_count():
    model = build_model(load_model_hparams("configs.config_model_117M"))
    expected = sum(math.prod(s) for s in openai_124M_shapes().values())
    assert expected == 124_439_808
    assert count_parameters(model) == expected


def test_117M_parameter_shapes_match_openai_layout():
    model = build_model(load_model_hparams("configs.config_model_117M"))
    params = dict(model.named_parameters())
    assert tuple(params["word_embedder._embedding"].shape) == (50257, 768)
    assert tuple(params["position_embedder._embedding"].shape) == (1024, 768)
    # No encoder-decoder attention: GPT-2 has none.
    assert not any("enc_dec" in n or "end_dec" in n for n in params)
    for i in range(12):
        attn = f"decoder.self_attns.{i}."
        for proj in "QKVO":
            assert tuple(params[attn + f"{proj}_dense.weight"].shape) == (768, 768)
        ffn = f"decoder.poswise_networks.{i}._layers."
        assert tuple(params[ffn + "0.weight"].shape) == (3072, 768)
        assert tuple(params[ffn + "2.weight"].shape) == (768, 3072)
    assert len(params) == 2 + 2 + 12 * 16


@pytest.mark.parametrize("name,sizes", [
    ("configs.config_model_345M", (50257, 1024, 1024, 16, 24)),
    ("configs.config_model_774M", (50257, 1024, 1280, 20, 36)),
    ("configs.config_model_1558M", (50257, 1024, 1600, 25, 48)),
])
def test_larger_configs_have_openai_sizes(name, sizes):
    keys = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
    assert model_size(load_model_hparams(name)) == dict(zip(keys, sizes))


def test_config_by_path(tmp_path):
    path = tmp_path / "my_conf.py"
    path.write_text("from utils.model import gpt2_hparams\n"
                    "hparams = gpt2_hparams(50257, 16, 8, 2, 1)\n")
    assert model_size(load_model_hparams(str(path)))["n_ctx"] == 16


@pytest.mark.parametrize("bad", ["configs.no_such_config", "nowhere/conf.py",
                                 "configs.config_train_missing"])
def test_unknown_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        load_model_hparams(bad)


def test_config_without_hparams_is_a_user_error(tmp_path):
    path = tmp_path / "empty_conf.py"
    path.write_text("x = 1\n")
    with pytest.raises(UserError, match="hparams"):
        load_model_hparams(str(path))


def test_mismatch_names_both_values():
    ours = load_model_hparams("configs.config_model_117M")
    theirs = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
              "n_layer": 24}
    with pytest.raises(UserError, match="n_embd=768 in cfg but 1024 in h.json"):
        check_sizes_agree(ours, theirs, "cfg", "h.json")
    check_sizes_agree(hparams_from_openai(theirs), theirs, "cfg", "h.json")


@pytest.mark.parametrize("name", ["117M", "345M", "774M", "1558M"])
def test_released_sizes_table_matches_the_configs_and_names_the_default_folder(name):
    """utils.checkpoints.weights finds a config's default folder from this table, without
    importing the four configs: the table must hold the configs' numbers."""
    import os
    from utils.checkpoints.weights import RELEASED_SIZES, default_pretrain_model_dir
    sizes = model_size(load_model_hparams(f"configs.config_model_{name}"))
    assert RELEASED_SIZES[name] == sizes
    assert default_pretrain_model_dir(sizes) == os.path.join(
        "gpt2_pretrained_models", f"model_{name}")


def test_unreleased_or_no_sizes_default_to_the_117M_folder():
    import os
    from utils.checkpoints.weights import default_pretrain_model_dir
    default = os.path.join("gpt2_pretrained_models", "model_117M")
    assert default_pretrain_model_dir(None) == default
    assert default_pretrain_model_dir(model_size(load_model_hparams(
        "configs.config_model_tiny"))) == default
