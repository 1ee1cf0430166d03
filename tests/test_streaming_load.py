"""Weights streamed into the model one tensor at a time (utils/checkpoints/streaming.py,
utils/decoding/load_targets.py): every format gives the same weights as the
model that was saved, int8 quantized while loading equals int8 quantized
afterwards, a damaged byte is still refused in one line, and an int8 load
never holds a float32 copy of the linear weights (peak RSS in a subprocess)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import convert_checkpoint
from utils.checkpoints.streaming import CPUTarget
from utils.checkpoints.weights import (CHECKPOINT_FORMAT, checkpoint_model_fields,
                                       load_weights, resolve_model, save_checkpoint)
from utils.decoding.engine import engine_for, prepare_for_decoding
from utils.decoding.generation import generate
from utils.decoding.int8_linear import int8_available
from utils.decoding.load_targets import ArenaTarget, Int8Target
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(n_vocab=50257, n_ctx=32, n_embd=32, n_head=4, n_layer=2)
NEVER = -1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random model and its files in our, OpenAI's and Hugging Face's formats."""
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(3)
    hparams = gpt2_hparams(**SIZES)
    model = build_model(hparams).eval()
    ckpt = str(root / "model.ckpt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "format": CHECKPOINT_FORMAT,
                           **checkpoint_model_fields(hparams)})
    dirs = {"ckpt": ckpt}
    for fmt in ("openai", "hf"):
        dirs[fmt] = str(root / fmt)
        assert convert_checkpoint.main([ckpt, dirs[fmt], "--format", fmt]) == 0
    return model, dirs


def resolved_for(fmt, path):
    if fmt == "ckpt":
        return resolve_model(checkpoint=path)
    return resolve_model(pretrain_model_dir=path, download=False)


@pytest.mark.parametrize("fmt", ["ckpt", "openai", "hf"])
@pytest.mark.parametrize("target", [CPUTarget, ArenaTarget])
def test_each_format_streams_the_saved_weights(saved, fmt, target):
    model, dirs = saved
    loaded = load_weights(resolved_for(fmt, dirs[fmt]), target()).model
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # The output layer is still the token embedding, not a copy of it.
    assert loaded.decoder._output_layer.weight is loaded.word_embedder._embedding


@pytest.mark.skipif(not int8_available(), reason="no fbgemm int8 kernels")
@pytest.mark.parametrize("fmt", ["ckpt", "openai", "hf"])
def test_int8_quantized_while_loading_equals_quantized_after(saved, fmt):
    _, dirs = saved
    after = load_weights(resolved_for(fmt, dirs[fmt])).model.requires_grad_(False)
    prepare_for_decoding(after, int8=True)
    during = load_weights(resolved_for(fmt, dirs[fmt]), Int8Target()).model
    prepare_for_decoding(during.requires_grad_(False), int8=True)
    # The linear weights were never kept in float32.
    assert during.decoder.self_attns[0].Q_dense.weight.device.type == "meta"
    contexts = [[464, 2068, 7586, 21831]]
    ids = [generate(m, contexts, 12, strategy="greedy", end_token=NEVER)
           for m in (after, during)]
    assert ids[0] == ids[1]
    x = torch.randn(1, 3, SIZES["n_embd"], generator=torch.Generator().manual_seed(0))
    for a, b in zip(engine_for(after).layers, engine_for(during).layers):
        for la, lb in zip(a.linears(), b.linears()):
            assert torch.equal(la(x if la is not a.fc2 else x.repeat(1, 1, 4)),
                               lb(x if lb is not b.fc2 else x.repeat(1, 1, 4)))


def _flip_byte(path, offset_from_end):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_corrupted_tf_byte_is_refused_in_one_line(saved, tmp_path):
    _, dirs = saved
    import shutil
    copy = str(tmp_path / "openai")
    shutil.copytree(dirs["openai"], copy)
    _flip_byte(os.path.join(copy, "model.ckpt.data-00000-of-00001"), 100)
    with pytest.raises(UserError) as err:
        load_weights(resolved_for("openai", copy), ArenaTarget())
    assert "checksum mismatch" in str(err.value) and "\n" not in str(err.value)


def test_a_non_finite_weight_streamed_from_a_checkpoint_is_refused(saved, tmp_path):
    model, _ = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["decoder.final_layer_norm.bias"][3] = float("nan")
    path = str(tmp_path / "nan.ckpt")
    save_checkpoint(path, {"model": state, "format": CHECKPOINT_FORMAT,
                           **checkpoint_model_fields(gpt2_hparams(**SIZES))})
    with pytest.raises(UserError, match="non-finite weights.*final_layer_norm.bias"):
        load_weights(resolve_model(checkpoint=path), ArenaTarget())


# A model whose linear layers outweigh the rest: 24 layers of 384 wide.
BIG = dict(n_vocab=50257, n_ctx=64, n_embd=384, n_head=6, n_layer=24)
_PEAK_SCRIPT = textwrap.dedent("""
    import re, sys
    sys.path.insert(0, {root!r})
    from utils.checkpoints.streaming import CPUTarget
    from utils.checkpoints.weights import load_weights, resolve_model
    from utils.decoding.engine import prepare_for_decoding
    from utils.decoding.load_targets import Int8Target

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    from utils.model import import_texar
    from utils.processor import get_encoder
    resolved = resolve_model(checkpoint={path!r})
    import_texar(), get_encoder(None)  # the runtime, measured apart from the weights
    before = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    target = Int8Target() if {int8!r} else CPUTarget()
    model = load_weights(resolved, target).model.requires_grad_(False)
    if {int8!r}:
        prepare_for_decoding(model, int8=True)
    print((kib("VmHWM") - before) * 1024)
""")


def _load_peak(path, int8):
    script = _PEAK_SCRIPT.format(root=ROOT, path=path, int8=int8)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not int8_available() or not os.path.exists("/proc/self/clear_refs"),
                    reason="needs fbgemm and Linux's /proc/self/clear_refs")
def test_int8_load_never_holds_a_float32_copy_of_the_linear_weights(tmp_path):
    torch.manual_seed(0)
    hparams = gpt2_hparams(**BIG)
    model = build_model(hparams, initialize=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    path = str(tmp_path / "big.ckpt")
    save_checkpoint(path, {"model": model.state_dict(), "format": CHECKPOINT_FORMAT,
                           **checkpoint_model_fields(hparams)})
    linear = sum(p.numel() * 4 for n, p in model.named_parameters()
                 if n.endswith("weight") and p.dim() == 2 and "embedd" not in n)
    total = sum(p.numel() * 4 for p in model.parameters())
    del model
    float_peak, int8_peak = _load_peak(path, False), _load_peak(path, True)
    # A float32 load holds the model once (a second copy would be 2x), plus
    # one block of rows of the file and the allocator's slack.
    assert 0.9 * total < float_peak < 1.4 * total, (float_peak, total)
    # int8 keeps the embeddings in float32 and the linear layers in 8 bits
    # (quantized, then packed: twice a quarter of their float32 bytes at
    # most): well below the float32 load, where holding their float32 copy
    # even once would put it above.
    assert int8_peak < float_peak - 0.25 * linear, (int8_peak, float_peak, linear)
