"""Which matrix-product kernels the generation engine uses on this device.

utils/generation.py runs every linear layer through one of the functions here:
- On x86 CPUs PyTorch's nn.Linear goes to MKL, whose matrix-vector product for
  torch's [out, in] weight layout streams weights well below memory bandwidth
  (measured ~12 GB/s of ~30 on the dev machine); oneDNN's linear (the op
  torch.compile uses on CPU) reads the same tensors 15-40% faster. It is a
  private op, so it is used only after a check that it exists and agrees with
  F.linear; anything else falls back to F.linear.
- CPU products in bfloat16/float16 over many rows are widened to float32
  (`upcast_linear`, see UPCAST_MIN_ROWS).
"""
import torch
import torch.nn.functional as F

# CPU matrix products in bfloat16/float16 (without native 16-bit arithmetic, as
# on AVX2) cost about as much per row as a matrix-vector product: fine for one
# decoding row, ~6x slower than float32 for a long prompt. From this many rows
# on, the weights are widened to float32 for the product (a transient copy of
# one matrix at a time, not a second model).
UPCAST_MIN_ROWS = 8

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


def linear_functions(device: torch.device, dtype: torch.dtype):
    """(linear, linear_then_gelu) for a model's weights on `device` in `dtype`."""
    if uses_onednn(device, dtype):
        return onednn_linear, onednn_linear_gelu
    return F.linear, linear_gelu


def upcasts(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products over UPCAST_MIN_ROWS rows or more go through upcast_linear."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
