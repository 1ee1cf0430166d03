"""GPT-2's GELU in one kernel: F.gelu(x, approximate="tanh") for texar's GPTGELU.

texar's GPTGELU writes 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
as eight element-wise passes; autograd keeps four [tokens, 4 * n_embd]
tensors of them per layer for backward (x, the tanh, 0.5 * x, 1 + tanh): at
1 x 1,024 tokens 50 MB per layer of GPT-2 124M. PyTorch's tanh-approximate
GELU, the same formula in one pass, keeps only x: 450 MB less over 12 layers.

`set_gelu(model, "fused")` installs that forward on the GPTGELU of every
feed-forward block (an instance attribute, as utils/fused_attention.py does
for attention); `set_gelu(model, "texar")` removes it. No parameters change.
build_model and the training config's `attention` choose both together:
"fused" (both kernels) or "texar" (texar's original forward throughout).
"""
import torch
import torch.nn.functional as F
from torch import nn

from utils.fused_attention import forward_of, switch_forward

GELUS = ("fused", "texar")


def fused_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_layers(model: nn.Module):
    """The GELU modules of the decoder's feed-forward blocks (texar's GPTGELU)."""
    return [layer for block in model.decoder.poswise_networks for layer in block.modules()
            if type(layer).__name__ == "GPTGELU"]


def set_gelu(model: nn.Module, gelu: str) -> nn.Module:
    """Install the one-kernel GELU ("fused") on every GPTGELU of `model`, or
    restore texar's ("texar"), in place; returns `model`."""
    if gelu not in GELUS:
        raise ValueError(f"gelu must be one of {GELUS}, not {gelu!r}")
    switch_forward(_gelu_layers(model), fused_gelu_forward, gelu == "fused")
    return model


def gelu_of(model: nn.Module) -> str:
    return forward_of(_gelu_layers(model))
