"""Which matrix-product kernels the generation engine uses on this device,
and the layers' weights prepared once for them.

utils/decoding/engine.py runs every linear layer through a `PreparedLinear`:
- On x86 CPUs PyTorch's nn.Linear goes to MKL. On AMD CPUs MKL's
  matrix-vector product for torch's [out, in] weight layout streams weights
  well below memory bandwidth (measured ~12 GB/s of ~30 on an EPYC), and
  oneDNN's linear (the op torch.compile uses on CPU) reads the same tensors
  15-40% faster. On Intel CPUs it is the other way round for a few rows (a
  Sapphire Rapids Xeon: MKL ~10% faster per decoding step at 1-3 rows, oneDNN
  faster from 4), so there products of fewer than ONEDNN_MIN_ROWS_ON_INTEL
  rows go to MKL. oneDNN's op is private, so it is used only after a check
  that it exists and agrees with F.linear; anything else falls back to
  F.linear.
- Q, K and V are one product over their weights concatenated (one kernel call
  instead of three; +5-10% at batch 1). Each output is the same dot product,
  and greedy ids are unchanged (tests/test_generation.py).
- Tried and dropped (benchmarks/bench_generate.py, quiet 2-core machine):
  weights reordered once into oneDNN's blocked layout (what torch.compile's
  freezing does) gained nothing measurable (+-2%) for a second copy of every
  block weight; an [in, out] copy of the output layer for MKL's x @ W was 8%
  slower.
- CPU products in bfloat16/float16 over many rows are widened to float32
  (see UPCAST_MIN_ROWS).
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from utils.decoding import weight_arena
from utils.device import cpu_vendor

# CPU matrix products in bfloat16/float16 (without native 16-bit arithmetic, as
# on AVX2) cost about as much per row as a matrix-vector product: fine for one
# decoding row, ~6x slower than float32 for a long prompt. From this many rows
# on, the weights are widened to float32 for the product (a transient copy of
# one matrix at a time, not a second model).
UPCAST_MIN_ROWS = 8

# On Intel CPUs, products of fewer rows than this (batch-1 to batch-3 decoding
# steps) run through MKL (F.linear), larger ones through oneDNN.
ONEDNN_MIN_ROWS_ON_INTEL = 4

_ONEDNN_OK = {}  # (device type, dtype) -> whether oneDNN's linear passed its check


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


def onednn_min_rows(device: torch.device) -> int:
    """Fewest rows a product on `device` needs to go through oneDNN rather
    than F.linear (when uses_onednn allows oneDNN at all)."""
    if device.type == "cpu" and cpu_vendor() == "GenuineIntel":
        return ONEDNN_MIN_ROWS_ON_INTEL
    return 1


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


def _fused(parts: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """Tensors concatenated along their first dimension: a view when they
    lie back to back in memory (utils/decoding/weight_arena.py), else a copy."""
    if len(parts) == 1:
        return parts[0]
    flat = weight_arena.joined(parts)
    if flat is None:
        return torch.cat(list(parts))
    return flat.view(-1, *parts[0].shape[1:])


class PreparedLinear:
    """y = act(x W^T + b) for one layer, or several fused along the outputs
    (Q, K, V). A fused weight is a view of the model's parameters when they
    lie back to back (a packed model), else a copy made once; a single weight
    is the model's own tensor."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 gelu: bool = False, activation: Optional[Callable] = None):
        weight, bias = _fused(weights), _fused(biases)
        device, dtype = weight.device, weight.dtype
        self.weight, self.bias = weight, bias
        self.onednn_min_rows = (onednn_min_rows(device) if uses_onednn(device, dtype)
                                else None)
        self.upcast = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        self.gelu = gelu
        self.activation = activation
        # Beside the model's parameters only when fusing had to copy.
        copied = weight.untyped_storage().data_ptr() != weights[0].untyped_storage().data_ptr()
        self.extra_bytes = weight.numel() * weight.element_size() if copied else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if self.upcast and rows >= UPCAST_MIN_ROWS:
            y = upcast_linear(x, self.weight, self.bias)
        elif self.onednn_min_rows is not None and rows >= self.onednn_min_rows:
            if self.gelu:
                return onednn_linear_gelu(x, self.weight, self.bias)
            y = onednn_linear(x, self.weight, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.gelu:
            return F.gelu(y, approximate="tanh")
        return self.activation(y) if self.activation is not None else y
