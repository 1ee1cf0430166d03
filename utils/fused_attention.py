"""Fused attention for texar's GPT2Decoder: PyTorch's scaled_dot_product_attention.

texar's MultiheadAttentionEncoder computes attention in separate passes: the
[batch, heads, T, T] logits, plus a bias, a softmax, a dropout, a product.
Each pass writes and (for backward) keeps a T x T tensor per head and layer:
at 1,024 tokens that is about 100 MB per layer of GPT-2 124M.
`torch.nn.functional.scaled_dot_product_attention` does the same arithmetic
in one kernel (flash attention on CPU and on CUDA, memory-efficient attention
when there is a mask) that never holds the T x T probabilities, skips the
masked half of a causal product, and draws the attention dropout inside.

`set_attention(model, "fused")` installs on each attention layer of a
GPT2Decoder (as an instance attribute, the way utils/training/memory_options.py
installs gradient checkpointing) a forward that runs that kernel on the
layer's own Q/K/V/O projections: no parameter, state_dict key or checkpoint
changes. `set_attention(model, "texar")` removes it, so texar's original
forward runs (the reference the tests compare against). build_model installs
it; the training config's `attention = "texar"` selects the original.

Which calls take the kernel:
- self-attention in a training or evaluation forward (no decoding cache):
  texar passes its lower-triangle bias, which becomes `is_causal=True`
  (checked in eager mode; any other bias is passed on as a mask);
- cross-attention to an encoder memory (memory mode): the padding bias is
  passed as the kernel's mask.
texar's own incremental decoding (`infer_*`, beam search) passes a cache to
self-attention, which then keeps texar's forward; it passes none to the
cross-attention, which is fused there too. This project's generation engine
(utils/decoding/engine.py) reads the weights and never calls these layers.
"""
import types

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("fused", "texar")


def fused_forward(self, queries: torch.Tensor, memory, memory_attention_bias,
                  cache=None) -> torch.Tensor:
    """The forward installed on a texar MultiheadAttentionEncoder `self` (see
    the module docstring); the arguments are texar's."""
    if cache is not None:  # texar's incremental decoding keeps its own path
        return type(self).forward(self, queries, memory, memory_attention_bias, cache)
    source = queries if memory is None else memory
    q = self._split_heads(self.Q_dense(queries))
    k = self._split_heads(self.K_dense(source))
    v = self._split_heads(self.V_dense(source))
    causal = memory is None and is_causal_bias(memory_attention_bias, q.size(2))
    mask = None if causal else _as_mask(memory_attention_bias, q)
    dropout = float(self._hparams.dropout_rate) if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         dropout_p=dropout, is_causal=causal)
    return self.O_dense(self._combine_heads(out))


def is_causal_bias(bias, length: int) -> bool:
    """Whether `bias` is texar's lower-triangle bias for `length` queries:
    [1, 1, T, T], negative exactly above the diagonal, zero elsewhere.

    The values are checked in eager mode (a T x T comparison, well under a
    millisecond per layer at 1,024 tokens); while torch.compile traces, only
    the shape is (texar's decoder passes no other [1, 1, T, T] bias).
    """
    if bias is None or tuple(bias.shape) != (1, 1, length, length):
        return False
    if torch.compiler.is_compiling():
        return True
    above = torch.ones(length, length, dtype=torch.bool, device=bias.device).triu(1)
    square = bias[0, 0]
    return bool(((square < 0) == above).all() and (square[~above] == 0).all())


def _as_mask(bias, like: torch.Tensor):
    """texar's additive bias as the kernel's float mask in the queries' dtype,
    clamped so that its -1e18 stays finite in float16."""
    if bias is None:
        return None
    return bias.to(device=like.device).clamp(min=torch.finfo(like.dtype).min).to(like.dtype)


def _attention_layers(model: nn.Module):
    """texar's attention layers of a GPT2Decoder: self-attention, and the
    cross-attention memory mode keeps."""
    decoder = model.decoder
    return list(decoder.self_attns) + list(decoder.enc_dec_attns)


def set_attention(model: nn.Module, attention: str) -> nn.Module:
    """Install the fused forward ("fused") on every attention layer of the
    GPT2Decoder `model`, or restore texar's own ("texar"), in place; returns
    `model`. Parameters and state_dict keys are the same either way."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
    switch_forward(_attention_layers(model), fused_forward, attention == "fused")
    return model


def attention_of(model: nn.Module) -> str:
    """"fused" or "texar": which forward `model`'s attention layers run."""
    return forward_of(_attention_layers(model))


def switch_forward(layers, forward, fused: bool) -> None:
    """Give each of `layers` `forward` as its own (fused), or take it away so
    the class's (texar's) runs again."""
    for layer in layers:
        if fused:
            layer.forward = types.MethodType(forward, layer)
        else:
            vars(layer).pop("forward", None)


def forward_of(layers) -> str:
    """"fused" when every one of `layers` runs a forward of its own, else "texar"."""
    fused = {"forward" in vars(layer) for layer in layers}
    return "fused" if fused == {True} else "texar"
