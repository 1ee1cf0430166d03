"""The training config's `compile = True`: torch.compile of the model's forward.

torch.compile traces the GPT2Decoder's forward (texar's Python included) into
graphs that Inductor turns into fused kernels: layer norms, GELU, residual
adds and dropout become a few loops instead of a pass each. Compiling costs
time once (about a minute for GPT-2 124M on two CPU cores, more the first
time each new sequence length shape arrives until shapes are marked dynamic),
so it is off by default.

Compiling can fail where the eager model runs (no C++ compiler for Inductor
on CPU, an unsupported construct in a future texar or torch): the forward
then falls back to eager for the rest of the run, with one line saying why.
"""
import sys
from typing import Callable

import torch
from torch import nn


class _CompiledForward:
    """model.forward's replacement: the compiled forward, or eager after it fails."""

    def __init__(self, eager: Callable):
        self.eager = eager
        self.compiled = torch.compile(eager)
        self.failed = False

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            self.failed = True
            reason = " ".join(str(err).split())[:160]
            print(f"note: compile = True could not compile the model ({type(err).__name__}: "
                  f"{reason}); training continues without compiling", file=sys.stderr)
            return self.eager(*args, **kwargs)


def compile_forward(model: nn.Module) -> None:
    """Make `model(...)` run torch.compile(model.forward), in place (the
    module, its parameters and state_dict stay the same objects)."""
    if not hasattr(torch, "compile"):
        print(f"note: compile = True needs torch >= 2.0 (this is {torch.__version__}); "
              f"training continues without compiling", file=sys.stderr)
        return
    model.forward = _CompiledForward(model.forward)


def is_compiled(model: nn.Module) -> bool:
    return isinstance(vars(model).get("forward"), _CompiledForward)
