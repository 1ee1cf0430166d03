"""utils/fused_attention.py: texar's attention layers through scaled_dot_product_attention.

Every comparison is against texar's own attention (the same model switched
with use(model, "texar")) and, on the TensorFlow-written fixtures,
against the reference logits transformers computed when they were made.
Tolerances come from the dtype's machine epsilon times the length of the
longest reduction the two paths order differently, times the magnitudes.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch

from utils.training.compiled_forward import compile_forward, is_compiled
from utils.errors import UserError
from utils.fused_attention import attention_of, is_causal_bias, set_attention
from utils.fused_gelu import gelu_of, set_gelu
from utils.training.lm import IGNORE_INDEX, lm_nll, target_mask
from utils.training.memory_options import enable_gradient_checkpointing
from utils.model import build_model, gpt2_hparams, hparams_from_openai
from utils.checkpoints.openai_weights import load_openai_weights
from utils.processor import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2")
HPARAMS = gpt2_hparams(50257, 64, 32, 4, 2)


def use(model, kind):
    """Switch `model` to the fused forward ("fused": attention and GELU) or
    texar's original one ("texar"), as build_model's `attention` does."""
    return set_gelu(set_attention(model, kind), kind)


def tolerance(dtype: torch.dtype, reduction: int, magnitude: float) -> float:
    """Bound on the difference of two orderings of the same float arithmetic:
    a few units of rounding per term of the longest reduction, at the size of
    the values compared."""
    return 4 * torch.finfo(dtype).eps * reduction * max(magnitude, 1.0)


def reduction_size(model, length: int) -> int:
    """The longest sum either path reorders: over the keys (length) and over
    the features (n_embd), in every layer."""
    dec = model.decoder._hparams
    return dec.num_blocks * (length + dec.dim)


def padded_batch(lengths, seed=0, width=None):
    """Random ids [B, max(lengths)] (or width), each row padded with EOS after its length."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(0, EOS_ID, (len(lengths), width), generator=gen)
    for row, length in enumerate(lengths):
        ids[row, length:] = EOS_ID
    return ids, torch.tensor(lengths)


def logits_and_grads(model, attention, ids, lengths, **forward):
    """Logits of a training forward, lm_nll's summed loss over them, and the
    gradients of the mean loss, with `attention`'s forward (the model stays on it).
    `forward`: extra arguments (memory mode's memory)."""
    use(model, attention)
    model.zero_grad(set_to_none=True)
    targets = ids[:, 1:]
    mask = target_mask(lengths, targets.size(1))
    logits = model(inputs=ids[:, :-1], decoding_strategy="train_greedy", **forward).logits
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.masked_fill(~mask, IGNORE_INDEX).reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")

    (nll / mask.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), nll.detach(), grads


def assert_same(model, ids, lengths, dtype=torch.float32, **forward):
    """Fused and texar attention give the same logits, loss and gradients."""
    fused = logits_and_grads(model, "fused", ids, lengths, **forward)
    texar = logits_and_grads(model, "texar", ids, lengths, **forward)
    use(model, "fused")
    reduction = reduction_size(model, ids.size(1))
    logits_tol = tolerance(dtype, reduction, float(texar[0].abs().max()))
    assert (fused[0] - texar[0]).abs().max() <= logits_tol
    assert abs(float(fused[1]) - float(texar[1])) <= tolerance(
        dtype, reduction * ids.numel(), float(texar[1].abs()) / ids.numel())
    for name, grad in texar[2].items():
        # Gradients sum over every position too.
        tol = tolerance(dtype, reduction * ids.size(1), float(grad.abs().max()))
        assert (fused[2][name] - grad).abs().max() <= tol, name
    return fused, texar


# ------------------------------------------------------------------ random models

def test_build_model_installs_the_fused_forward_and_texar_stays_selectable():
    model = build_model(HPARAMS)
    assert attention_of(model) == "fused" and gelu_of(model) == "fused"
    original = build_model(HPARAMS, attention="texar")
    assert attention_of(original) == "texar" and gelu_of(original) == "texar"
    assert attention_of(use(model, "texar")) == "texar"
    assert attention_of(copy.deepcopy(use(model, "fused"))) == "fused"
    with pytest.raises(ValueError, match="attention must be one of"):
        use(model, "flash")
    # Same parameters and state_dict keys either way.
    assert list(build_model(HPARAMS).state_dict()) == list(
        build_model(HPARAMS, attention="texar").state_dict())


@pytest.mark.parametrize("lengths", [[17, 17, 17], [17, 9, 3, 12]])
def test_random_model_logits_and_gradients_equal_texar_with_and_without_padding(lengths):
    torch.manual_seed(1)
    model = build_model(HPARAMS).train()  # dropout 0: training forward, deterministic
    ids, lengths = padded_batch(lengths, seed=len(lengths))
    fused, _ = assert_same(model, ids, lengths)
    # Causal: a row's logits do not depend on what pads it.
    other = ids.clone()
    for row, length in enumerate(lengths.tolist()):
        other[row, length:] = 7
    use(model, "fused")
    with torch.no_grad():
        again = model(inputs=other[:, :-1], decoding_strategy="train_greedy").logits
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(again[row, :length - 1], fused[0][row, :length - 1])


def test_evaluation_forward_equals_texar_and_gradient_checkpointing_too():
    torch.manual_seed(2)
    model = build_model(HPARAMS).eval()
    ids, lengths = padded_batch([30, 21], seed=3)
    with torch.no_grad():
        nll_fused, _ = lm_nll(use(model, "fused"), ids, lengths, per_token=True)
        nll_texar, _ = lm_nll(use(model, "texar"), ids, lengths, per_token=True)
    assert abs(float(nll_fused) - float(nll_texar)) <= tolerance(
        torch.float32, reduction_size(model, 30) * ids.numel(), float(nll_texar) / ids.numel())
    model.train()
    plain = assert_same(model, ids, lengths)[0]
    enable_gradient_checkpointing(model)
    checkpointed = logits_and_grads(model, "fused", ids, lengths)
    for name, grad in plain[2].items():
        assert torch.allclose(checkpointed[2][name], grad, rtol=0, atol=tolerance(
            torch.float32, reduction_size(model, 30), float(grad.abs().max()))), name


def test_attention_dropout_is_drawn_inside_the_kernel_only_in_training():
    hparams = gpt2_hparams(50257, 64, 32, 4, 2)
    hparams["decoder"]["multihead_attention"]["dropout_rate"] = 0.5  # attention only
    torch.manual_seed(3)
    model = build_model(hparams)
    ids, _ = padded_batch([20, 20], seed=4)
    forward = dict(inputs=ids, decoding_strategy="train_greedy")
    with torch.no_grad():
        model.eval()
        fused_eval = model(**forward).logits
        texar_eval = use(model, "texar")(**forward).logits
        assert torch.allclose(fused_eval, texar_eval, rtol=0, atol=tolerance(
            torch.float32, reduction_size(model, 20), float(texar_eval.abs().max())))
        use(model, "fused").train()
        first, second = model(**forward).logits, model(**forward).logits
    assert not torch.allclose(first, fused_eval) and not torch.allclose(first, second)
    # One layer's output is linear in its attention weights, so dropout (which
    # rescales what it keeps by 1 / (1 - p)) leaves its mean unchanged: averaged
    # over draws, the training outputs approach the evaluation output, as
    # texar's own dropout's do.
    layer = model.decoder.self_attns[0]
    x = torch.randn(1, 16, 32)
    bias = _lower_triangle(16)
    with torch.no_grad():
        expected = layer.eval()(queries=x, memory=None, memory_attention_bias=bias)
        layer.train()
        draws = torch.stack([layer(queries=x, memory=None, memory_attention_bias=bias)
                             for _ in range(400)])
    spread = (draws[0] - expected).abs().mean()
    assert spread > 0.01 * expected.abs().mean()  # dropout happened
    assert (draws.mean(0) - expected).abs().mean() < 0.15 * spread  # ~1/sqrt(400)


def _lower_triangle(length):
    from utils.model import import_texar
    return import_texar().utils.transformer_attentions.attention_bias_lower_triangle(length)


def test_fused_gelu_is_gpt2s_tanh_gelu():
    model = build_model(HPARAMS)
    block = model.decoder.poswise_networks[0]
    gelu = [m for m in block.modules() if type(m).__name__ == "GPTGELU"][0]
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    exact = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    x32 = x.float().requires_grad_(True)
    fused = gelu(x32)
    fused.sum().backward()
    assert (fused.double() - exact).abs().max() <= tolerance(torch.float32, 8, 12.0)
    set_gelu(model, "texar")
    x_texar = x.float().requires_grad_(True)
    gelu(x_texar).sum().backward()
    assert (x32.grad - x_texar.grad).abs().max() <= tolerance(torch.float32, 8, 1.0)
    with pytest.raises(ValueError, match="gelu must be one of"):
        set_gelu(model, "relu")


def test_causal_bias_detection():
    from utils.model import import_texar
    attn = import_texar().utils.transformer_attentions
    assert is_causal_bias(attn.attention_bias_lower_triangle(6), 6)
    assert not is_causal_bias(attn.attention_bias_lower_triangle(6), 5)
    assert not is_causal_bias(attn.attention_bias_local(6, 2, 0), 6)  # a window
    assert not is_causal_bias(torch.zeros(1, 1, 6, 6), 6)
    assert not is_causal_bias(None, 6)


def test_any_other_self_attention_bias_is_passed_as_a_mask():
    """A bias that is not texar's lower triangle (a local window) is not
    taken for causal: the result equals texar's with that bias."""
    from utils.model import import_texar
    attn = import_texar().utils.transformer_attentions
    torch.manual_seed(6)
    layer = build_model(HPARAMS).decoder.self_attns[0].eval()
    x = torch.randn(2, 10, 32)
    bias = attn.attention_bias_local(10, 3, 0)
    with torch.no_grad():
        fused = layer(queries=x, memory=None, memory_attention_bias=bias)
        vars(layer).pop("forward")
        texar = layer(queries=x, memory=None, memory_attention_bias=bias)
    assert torch.allclose(fused, texar, rtol=0, atol=tolerance(torch.float32, 10 + 32, 1.0))


def test_bf16_autocast_equals_texar_within_bfloat16_rounding():
    torch.manual_seed(7)
    model = build_model(HPARAMS).train()
    ids, lengths = padded_batch([24, 13], seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = use(model, "fused")(inputs=ids, decoding_strategy="train_greedy")
        texar = use(model, "texar")(inputs=ids, decoding_strategy="train_greedy")
    fused, texar = fused.logits.detach().float(), texar.logits.detach().float()
    tol = tolerance(torch.bfloat16, reduction_size(model, 24), float(texar.abs().max()))
    assert (fused - texar).abs().max() <= tol


# ------------------------------------------------------------------ memory mode

def test_memory_mode_cross_attention_equals_texar_and_decoding_is_unchanged():
    torch.manual_seed(9)
    model = build_model(HPARAMS, with_memory=True).train()
    ids, lengths = padded_batch([12, 7], seed=10)
    memory = torch.randn(2, 9, 32)
    memory_len = torch.tensor([9, 4])  # the second memory padded
    forward = dict(memory=memory, memory_sequence_length=memory_len)
    assert_same(model, ids, lengths, **forward)
    # texar's incremental decoding: self-attention (with a cache) keeps texar's
    # forward; the cross-attention (texar passes it no cache) is fused.
    model.eval()
    decode = dict(start_tokens=torch.tensor([EOS_ID, EOS_ID]), end_token=EOS_ID,
                  decoding_strategy="infer_greedy", max_decoding_length=6, **forward)
    with torch.no_grad():
        fused, _ = use(model, "fused")(**decode)
        texar, _ = use(model, "texar")(**decode)
    assert torch.equal(fused.sample_id, texar.sample_id)
    assert (fused.logits - texar.logits).abs().max() <= tolerance(
        torch.float32, reduction_size(model, 9), float(texar.logits.abs().max()))


# ------------------------------------------------------------------ TF fixtures

@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_tf_fixture_logits_and_gradients_equal_texar_and_the_reference(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        meta = json.load(f)
    ref = np.load(os.path.join(FIXTURES, "reference", name + ".npz"), allow_pickle=False)
    model = build_model(hparams_from_openai(meta["hparams"])).train()
    load_openai_weights(model, os.path.join(FIXTURES, "models", name, "model.ckpt"))
    # The reference rows as one padded batch (ragged lengths).
    lengths = torch.from_numpy(ref["lengths"]).long()
    width = int(lengths.max())
    ids = torch.full((len(lengths), width), EOS_ID, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        ids[row, :length] = torch.from_numpy(ref["input_ids"][row, :length])
    assert_same(model, ids, lengths)
    with torch.no_grad():
        logits = model.eval()(inputs=ids, decoding_strategy="train_greedy").logits
    for row, length in enumerate(lengths.tolist()):
        # The fixtures' own tolerance against transformers (tests/test_checkpoint.py).
        np.testing.assert_allclose(logits[row, :length][:, ref["vocab_ids"]].numpy(),
                                   ref["logits_at_vocab_ids"][row, :length], atol=1e-4, rtol=0)


# ------------------------------------------------------------------ training config

def test_training_config_selects_the_attention_and_refuses_bad_values(tmp_path):
    from test_train import data_dir as _unused  # noqa: F401 (shares test_train's helpers)
    from test_train import train_config
    from utils.training.config import load_train_config
    data = tmp_path / "data"
    data.mkdir()
    assert load_train_config(train_config(tmp_path, data)).attention == "fused"
    assert load_train_config(train_config(tmp_path, data)).compile is False
    cfg = load_train_config(train_config(tmp_path, data, attention="texar", compile=True))
    assert (cfg.attention, cfg.compile) == ("texar", True)
    with pytest.raises(UserError, match="attention = 'flash'.*'fused'.*'texar'"):
        load_train_config(train_config(tmp_path, data, attention="flash"))
    with pytest.raises(UserError, match="compile = 1.*True or False"):
        load_train_config(train_config(tmp_path, data, compile=1))


def test_trainer_applies_the_configured_attention(tmp_path):
    from test_train import train_config
    import prepare_data
    from utils.training import distributed as dist_utils
    from utils.data.records import PreparedSplit
    from utils.training.config import load_train_config
    from utils.training.trainer import Trainer
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("one two three\nfour five six seven\n")
    prepare_data.main(["--quiet", "--data_dir", str(data), "--max_seq_length", "24"])
    ctx = dist_utils.init_distributed(False)
    split = PreparedSplit(str(data / "train.npy"))
    for attention in ("texar", "fused"):
        cfg = load_train_config(train_config(tmp_path, data, attention=attention))
        model = build_model(gpt2_hparams(50257, 32, 16, 2, 2))
        out = tmp_path / f"out_{attention}"
        out.mkdir()
        trainer = Trainer(model, gpt2_hparams(50257, 32, 16, 2, 2), cfg, ctx, split, None,
                          str(out), progress=False)
        assert attention_of(trainer.plain_model) == gelu_of(trainer.plain_model) == attention


def test_compile_falls_back_to_eager_with_one_note(monkeypatch, capsys):
    """A backend that fails to compile (as Inductor does without a C++ compiler)
    leaves a working model and one note."""
    real_compile = torch.compile

    def no_compiler(graph, example_inputs):  # as Inductor fails without a C++ compiler
        raise RuntimeError("no C++ compiler")

    def failing_compile(fn, **kwargs):  # dynamo traces for real, the backend fails
        return real_compile(fn, backend=no_compiler, **kwargs)
    monkeypatch.setattr(torch, "compile", failing_compile)
    torch.manual_seed(11)
    model = build_model(HPARAMS).eval()
    ids, _ = padded_batch([9, 9], seed=12)
    with torch.no_grad():
        eager = model(inputs=ids, decoding_strategy="train_greedy").logits
        compile_forward(model)
        assert is_compiled(model)
        first = model(inputs=ids, decoding_strategy="train_greedy").logits
        second = model(inputs=ids, decoding_strategy="train_greedy").logits
    assert torch.equal(first, eager) and torch.equal(second, eager)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not compile" in err[0] and "without compiling" in err[0]
    assert list(model.state_dict()) == list(build_model(HPARAMS).state_dict())


# ------------------------------------------------------------------ CUDA (gpu_check.sh)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_fused_attention_equals_texar_with_padding_and_memory(precision):
    """On CUDA the kernel is flash or memory-efficient attention: fp32 logits,
    loss and gradients, and bf16-autocast logits, equal texar's."""
    torch.manual_seed(13)
    model = build_model(HPARAMS, with_memory=True).cuda().train()
    ids, lengths = padded_batch([40, 23, 7], seed=14)
    ids, lengths = ids.cuda(), lengths.cuda()
    forward = dict(memory=torch.randn(3, 9, 32, device="cuda"),
                   memory_sequence_length=torch.tensor([9, 4, 1], device="cuda"))
    if precision == "fp32":
        assert_same(model, ids, lengths, **forward)
        return
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = use(model, "fused")(inputs=ids, **forward).logits.float()
        texar = use(model, "texar")(inputs=ids, **forward).logits.float()
    assert (fused - texar).abs().max() <= tolerance(
        torch.bfloat16, reduction_size(model, 40), float(texar.abs().max()))
