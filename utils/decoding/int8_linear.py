"""8-bit linear layers for decoding (`--dtype int8`), built at load time.

Each linear layer's float32 weight is quantized per output channel to int8
(symmetric, scale = max |w| / 127) and packed once for fbgemm, PyTorch's x86
int8 matrix library; at run time `quantized.linear_dynamic` quantizes each
activation row block to 8 bits on the fly, multiplies in integers and returns
float32. Decoding reads a quarter of float32's weight bytes, which is what a
batch-1 step is bound by. Layer norms, attention, the embeddings and the KV
cache stay float32; the output layer (tied to the word embedding) gets its own
int8 copy, the largest single saving.

The model's float32 parameters are kept (the embedding lookups and any later
float32 use read them), so memory grows by about a quarter of the weights.
"""
import warnings
from typing import Optional, Sequence

import torch

from utils.errors import UserError

INT8_FIX = "use --dtype float32 or bfloat16"


def int8_available() -> bool:
    """Whether this PyTorch build has the x86 int8 kernels (fbgemm)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def require_int8(device: torch.device) -> None:
    if device.type != "cpu":
        raise UserError(f"--dtype int8 runs on the CPU only (this run is on "
                        f"{device.type}): use --device cpu or {INT8_FIX}")
    if not int8_available():
        raise UserError(f"this PyTorch build has no int8 CPU kernels (fbgemm): "
                        f"{INT8_FIX}")


class Int8Linear:
    """y = act(x W^T + b) with W in int8 (one scale per output row)."""

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                 gelu: bool = False, activation=None):
        weight = torch.cat([w.detach().float() for w in weights])
        bias = torch.cat([b.detach().float() if b is not None
                          else torch.zeros(w.size(0)) for w, b in zip(weights, biases)])
        scale = (weight.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, still work
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scale, torch.zeros_like(
                scale, dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, bias)
        self.gelu, self.activation = gelu, activation
        self.extra_bytes = weight.numel() + 8 * scale.numel() + 4 * bias.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(),
                                               self.packed, True)
        y = y.view(*shape[:-1], y.size(-1))
        if self.gelu:
            return torch.nn.functional.gelu(y, approximate="tanh")
        return self.activation(y) if self.activation is not None else y


class Int8Layers:
    """Marks a model for int8 decoding: utils/decoding/engine.py builds its linear
    layers as Int8Linear (see `quantize_for_decoding`)."""
    linear = Int8Linear


def quantize_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Mark `model` (a float32 GPT2Decoder on the CPU) for int8 decoding:
    the engine built for it from now on (utils/decoding/engine.py) quantizes
    its linear layers into 8-bit copies. Returns the model."""
    require_int8(next(model.parameters()).device)
    if next(model.parameters()).dtype != torch.float32:
        raise UserError("int8 decoding starts from float32 weights: load the "
                        "model in float32 before quantizing")
    model._decoding_layers = Int8Layers
    return model


def decoding_layers(model: torch.nn.Module) -> Optional[type]:
    return getattr(model, "_decoding_layers", None)
