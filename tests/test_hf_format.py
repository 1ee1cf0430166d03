"""utils.checkpoints.hf_names: texar GPT2Decoder <-> Hugging Face GPT2LMHeadModel tensor names.

Checked three ways: the round trip is exact; tensors renamed from TensorFlow
checkpoints by transformers' own rule convert into a texar model that
reproduces the logits transformers recorded for them (tests/fixtures/tf_gpt2);
and, when transformers is installed, a GPT2LMHeadModel holding converted
weights computes our model's logits.
"""
import json
import os
import re

import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.checkpoints.hf_names import hf_gpt2_config, hf_to_texar_state_dict, texar_to_hf_state_dict
from utils.model import build_model, gpt2_hparams, hparams_from_openai, model_size
from utils.checkpoints.tf_reader import TFCheckpointReader

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2")
N_EMBD, N_LAYER = 16, 3
LAYER_TENSORS = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(11)
    return build_model(gpt2_hparams(n_vocab=97, n_ctx=24, n_embd=N_EMBD, n_head=4,
                                    n_layer=N_LAYER)).eval()


def test_round_trip_is_exact_and_loads_strictly(tiny):
    texar_state = tiny.state_dict()
    hf_state = texar_to_hf_state_dict(texar_state, N_LAYER)
    back = hf_to_texar_state_dict(hf_state, N_LAYER)
    assert sorted(back) == sorted(texar_state)
    for name, tensor in texar_state.items():
        assert torch.equal(back[name], tensor), name
    again = build_model(gpt2_hparams(n_vocab=97, n_ctx=24, n_embd=N_EMBD, n_head=4,
                                     n_layer=N_LAYER))
    again.load_state_dict(back)  # strict: every texar parameter, nothing else
    ids = torch.tensor([[5, 9, 96, 0, 41]])
    with torch.no_grad():
        assert torch.equal(again.eval()(inputs=ids).logits, tiny(inputs=ids).logits)


def test_hf_names_shapes_and_layout(tiny):
    hf_state = texar_to_hf_state_dict(tiny.state_dict(), N_LAYER)
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias", "lm_head.weight"}
    expected |= {f"transformer.h.{i}.{t}" for i in range(N_LAYER) for t in LAYER_TENSORS}
    assert set(hf_state) == expected
    assert hf_state["lm_head.weight"] is hf_state["transformer.wte.weight"]
    layer = "transformer.h.1."
    assert hf_state[layer + "attn.c_attn.weight"].shape == (N_EMBD, 3 * N_EMBD)  # [in, out]
    assert hf_state[layer + "mlp.c_fc.weight"].shape == (N_EMBD, 4 * N_EMBD)
    assert hf_state[layer + "mlp.c_proj.weight"].shape == (4 * N_EMBD, N_EMBD)
    attn = tiny.decoder.self_attns[1]
    fused_w = hf_state[layer + "attn.c_attn.weight"]
    fused_b = hf_state[layer + "attn.c_attn.bias"]
    for j, dense in enumerate([attn.Q_dense, attn.K_dense, attn.V_dense]):  # q | k | v
        part = slice(j * N_EMBD, (j + 1) * N_EMBD)
        assert torch.equal(fused_w[:, part], dense.weight.t())
        assert torch.equal(fused_b[part], dense.bias)


def hf_name_of_tf(tf_name):
    """transformers' rule (load_tf_weights_in_gpt2): model/h3/attn/c_attn/w ->
    transformer.h.3.attn.c_attn.weight; g and w are weights, b biases."""
    parts = []
    for piece in tf_name.split("/")[1:]:
        layer = re.fullmatch(r"h(\d+)", piece)
        parts += ["h", layer.group(1)] if layer else [
            {"w": "weight", "g": "weight", "b": "bias"}.get(piece, piece)]
    if parts[0] in ("wte", "wpe"):
        parts.append("weight")
    return "transformer." + ".".join(parts)


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_hf_tensors_of_a_tf_checkpoint_give_the_logits_transformers_recorded(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        hparams = json.load(f)["hparams"]
    ref = np.load(os.path.join(FIXTURES, "reference", name + ".npz"), allow_pickle=False)
    hf_state = {}
    with TFCheckpointReader(os.path.join(FIXTURES, "models", name, "model.ckpt")) as reader:
        for tf_name in reader.variables():
            array = np.array(reader.read(tf_name))
            hf_state[hf_name_of_tf(tf_name)] = torch.from_numpy(
                array[0] if array.ndim == 3 else array)  # TF's [1, in, out] conv weights
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    gpt2 = build_model(hparams_from_openai(hparams)).eval()
    gpt2.load_state_dict(hf_to_texar_state_dict(hf_state, hparams["n_layer"]))
    for b, length in enumerate(ref["lengths"]):
        ids = torch.from_numpy(ref["input_ids"][b:b + 1, :length].astype(np.int64))
        with torch.no_grad():
            logits = gpt2(inputs=ids).logits[0]
        np.testing.assert_allclose(logits[:, ref["vocab_ids"]].numpy(),
                                   ref["logits_at_vocab_ids"][b, :length], atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits[-1].numpy(), ref["logits_last"][b], atol=1e-4, rtol=0)
    back = texar_to_hf_state_dict(gpt2.state_dict(), hparams["n_layer"])
    assert sorted(back) == sorted(hf_state)
    for key, tensor in hf_state.items():
        assert torch.equal(back[key], tensor), key


def test_bad_hf_weights_are_one_line_errors(tiny):
    hf_state = texar_to_hf_state_dict(tiny.state_dict(), N_LAYER)
    # Attention masks older transformers saved beside the weights are not weights.
    masks = {"transformer.h.0.attn.bias": torch.ones(1), "transformer.h.0.attn.masked_bias":
             torch.ones(1)}
    assert sorted(hf_to_texar_state_dict({**hf_state, **masks}, N_LAYER)) == \
        sorted(tiny.state_dict())
    missing = dict(hf_state)
    del missing["transformer.h.2.mlp.c_fc.bias"]
    with pytest.raises(UserError, match=r"^the Hugging Face GPT-2 weights have no tensor "
                                        r"transformer\.h\.2\.mlp\.c_fc\.bias: they are not a "
                                        r"GPT-2 of 3 layers$"):
        hf_to_texar_state_dict(missing, N_LAYER)
    with pytest.raises(UserError, match=r"hold tensors a GPT-2 of 2 layers does not have "
                                        r"\(transformer\.h\.2\.attn\.c_attn\.bias, .*, \.\.\.\)"
                                        r": check the model's n_layer$"):
        hf_to_texar_state_dict(hf_state, 2)
    odd = {**hf_state, "transformer.h.0.attn.c_attn.weight": torch.zeros(N_EMBD, 40)}
    with pytest.raises(UserError, match=r"c_attn\.weight has shape \[16, 40\] .*not a fused "
                                        r"q\|k\|v projection"):
        hf_to_texar_state_dict(odd, N_LAYER)
    with pytest.raises(UserError, match="texar GPT2Decoder weights have no tensor"):
        texar_to_hf_state_dict(tiny.state_dict(), N_LAYER + 1)


def test_transformers_model_with_converted_weights_computes_our_logits(tiny):
    import transformers  # a test dependency (requirements-test.txt)
    sizes = model_size(tiny.hparams.todict())
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2_config(sizes)))
    hf.load_state_dict(texar_to_hf_state_dict(tiny.state_dict(), sizes["n_layer"]))
    ids = torch.tensor([[5, 9, 96, 0, 41, 3, 3, 7]])
    with torch.no_grad():
        ours, theirs = tiny(inputs=ids).logits, hf.eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_lazy_hf_tensors_match_the_state_dict_and_shapes(tiny):
    from utils.checkpoints.hf_names import hf_tensor_shapes, texar_to_hf_tensors
    sizes = model_size(tiny.hparams.todict())
    full = texar_to_hf_state_dict(tiny.state_dict(), N_LAYER)
    lazy = texar_to_hf_tensors(tiny.state_dict(), N_LAYER)
    assert not isinstance(lazy, dict)
    pairs = list(lazy)
    assert sorted(n for n, _ in pairs) == sorted(set(full) - {"lm_head.weight"})
    assert all(torch.equal(full[n], t) for n, t in pairs)
    assert hf_tensor_shapes(sizes) == {n: tuple(t.shape) for n, t in sorted(pairs)}


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_openai_hf_openai_round_trip_through_written_files(name, tmp_path):
    """OpenAI -> HF directory -> OpenAI checkpoint, tensors equal at every hop,
    the last one written by our TF writer and read by our reader."""
    from utils.checkpoints.hf_dir import read_hf_config, read_hf_weights, write_hf_dir
    from utils.checkpoints.hf_names import hf_name_of_openai, openai_of_hf_tensors
    from utils.checkpoints.tf_writer import write_tf_checkpoint_dir
    with open(os.path.join(FIXTURES, "models", name, "hparams.json")) as f:
        sizes = json.load(f)
    source = TFCheckpointReader(os.path.join(FIXTURES, "models", name, "model.ckpt"))
    originals = {n: np.array(source.read(n)) for n in source.variables()}
    # transformers' renaming rule, written independently in this test file, agrees.
    assert {hf_name_of_openai(n) for n in originals} == {hf_name_of_tf(n) for n in originals}

    def hf_tensors():  # one tensor at a time, straight from the TF reader
        for tf_name in source.variables():
            array = torch.from_numpy(np.array(source.read(tf_name)))
            yield hf_name_of_openai(tf_name), array[0] if array.dim() == 3 else array

    write_hf_dir(str(tmp_path / "hf"), hf_tensors(), sizes)
    assert read_hf_config(str(tmp_path / "hf")) == sizes
    texar_state = read_hf_weights(str(tmp_path / "hf"), sizes)
    back = texar_to_hf_state_dict(texar_state, sizes["n_layer"])
    written = write_tf_checkpoint_dir(str(tmp_path / "openai"),
                                      openai_of_hf_tensors(back.items()))
    assert sorted(written) == sorted(originals)
    with TFCheckpointReader(str(tmp_path / "openai" / "model.ckpt")) as reader:
        for tf_name, array in originals.items():
            assert reader.tf_dtype(tf_name) == "float32"
            assert np.array_equal(reader.read(tf_name), array), tf_name
