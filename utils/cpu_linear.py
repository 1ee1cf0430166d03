"""Which matrix-product kernels the generation engine uses on this device,
and the layers' weights prepared once for them.

utils/gpt2_net.py runs every linear layer through a `PreparedLinear`:
- On x86 CPUs PyTorch's nn.Linear goes to MKL, whose matrix-vector product for
  torch's [out, in] weight layout streams weights well below memory bandwidth
  (measured ~12 GB/s of ~30 on the dev machine); oneDNN's linear (the op
  torch.compile uses on CPU) reads the same tensors 15-40% faster, and faster
  still from a weight reordered once into oneDNN's blocked layout (what
  torch.compile's freezing does). It is a private op, so it is used only after
  a check that it exists and agrees with F.linear; anything else falls back to
  F.linear.
- Q, K and V are one product over their weights concatenated (one kernel call
  instead of three). Each output is the same dot product as before; the check
  below confirms the results are bit-identical.
- CPU products in bfloat16/float16 over many rows are widened to float32
  (see UPCAST_MIN_ROWS).
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

# CPU matrix products in bfloat16/float16 (without native 16-bit arithmetic, as
# on AVX2) cost about as much per row as a matrix-vector product: fine for one
# decoding row, ~6x slower than float32 for a long prompt. From this many rows
# on, the weights are widened to float32 for the product (a transient copy of
# one matrix at a time, not a second model).
UPCAST_MIN_ROWS = 8

# Decoding steps (one row per sequence) use the reordered weight; long prompt
# passes use the plain one, which oneDNN blocks for many rows itself.
PACKED_MAX_ROWS = 16

# The output layer's [vocabulary, D] weight (154 MB in GPT-2 124M float32)
# is too big for any cache; oneDNN and MKL stream it at ~10 GB/s in torch's
# [out, in] layout, while MKL's x @ W over an [in, out] copy streams it about
# twice as fast. The copy costs the weight's size once more.
OUTPUT_TRANSPOSED = True

_ONEDNN_OK = {}  # (device type, dtype) -> whether oneDNN's linear passed its check
_REORDER_OK = {}  # dtype -> whether a reordered weight gives identical results


def onednn_linear(x, weight, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear_gelu(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")


def linear_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def upcast_linear(x, weight, bias=None):
    bias = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), bias).to(x.dtype)


def uses_onednn(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to run the linear layers through oneDNN on this device/dtype
    (checked once per pair against F.linear on a small random product)."""
    key = (device.type, dtype)
    if key not in _ONEDNN_OK:
        _ONEDNN_OK[key] = (device.type == "cpu"
                           and dtype in (torch.float32, torch.bfloat16)
                           and _onednn_agrees(dtype))
    return _ONEDNN_OK[key]


def _onednn_agrees(dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 2, 16, generator=g).to(dtype)
        w = torch.randn(8, 16, generator=g).to(dtype)
        b = torch.randn(8, generator=g).to(dtype)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return (torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b),
                               atol=tol, rtol=tol)
                and torch.allclose(onednn_linear_gelu(x, w, b), linear_gelu(x, w, b),
                                   atol=tol, rtol=tol))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _reorder(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """`weight` in oneDNN's blocked layout for one-row products, or None when
    this build lacks the op or its results differ from the plain layout's."""
    if weight.dtype not in _REORDER_OK:
        _REORDER_OK[weight.dtype] = _reorder_is_exact(weight.dtype)
    if not _REORDER_OK[weight.dtype]:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def _reorder_is_exact(dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=g).to(dtype)
        b = torch.randn(96, generator=g).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        return all(torch.equal(onednn_linear(x, packed, b), onednn_linear(x, w, b))
                   for x in (torch.randn(1, 64, generator=g).to(dtype),
                             torch.randn(5, 64, generator=g).to(dtype),
                             torch.randn(PACKED_MAX_ROWS, 64, generator=g).to(dtype)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class PreparedLinear:
    """y = act(x W^T + b) for one layer, or several fused along the outputs
    (Q, K, V), with the weight in the layout its kernel reads fastest.

    Fused or reordered weights are copies made once (the model's parameters
    are left as they are); a single plain weight is the model's own tensor.
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 gelu: bool = False, activation: Optional[Callable] = None,
                 transposed: bool = False):
        weight = weights[0] if len(weights) == 1 else torch.cat(list(weights))
        bias = biases[0] if len(biases) == 1 else torch.cat(list(biases))
        device, dtype = weight.device, weight.dtype
        self.weight, self.bias = weight, bias
        self.onednn = uses_onednn(device, dtype)
        self.packed = _reorder(weight) if self.onednn and dtype == torch.float32 else None
        self.upcast = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        self.gelu = gelu
        self.activation = activation
        # [in, out] copy for MKL's x @ W product (see OUTPUT_TRANSPOSED)
        self.transposed = (weight.t().contiguous()
                           if transposed and device.type == "cpu"
                           and dtype == torch.float32 else None)
        self.extra_bytes = ((weight.numel() * weight.element_size() if len(weights) > 1 else 0)
                            + (self.packed.numel() * self.packed.element_size()
                               if self.packed is not None else 0)
                            + (self.transposed.numel() * self.transposed.element_size()
                               if self.transposed is not None else 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if self.upcast and rows >= UPCAST_MIN_ROWS:
            y = upcast_linear(x, self.weight, self.bias)
        elif self.transposed is not None:
            y = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.transposed)
            y = y.view(*x.shape[:-1], y.size(-1))
        elif self.onednn:
            weight = (self.packed if self.packed is not None and rows <= PACKED_MAX_ROWS
                      else self.weight)
            if self.gelu:
                return onednn_linear_gelu(x, weight, self.bias)
            y = onednn_linear(x, weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.gelu:
            return F.gelu(y, approximate="tanh")
        return self.activation(y) if self.activation is not None else y
