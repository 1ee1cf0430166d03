"""The batch-1 decoding step on the CPU as compiled kernels.

At batch 1 a decoding step is a chain of matrix-vector products, each
streaming its weights from memory, with small ops in between. Here a step is
one compiled kernel per layer plus the attention over the cache (eager):
  - first: layer 0's layer norm + fused Q/K/V product;
  - then, per layer i: output projection + residual + layer norm + the
    feed-forward layers with GELU + residual, followed by layer i+1's layer
    norm + Q/K/V product; for the last layer, the final layer norm and the
    output layer instead, so the kernel returns the logits.
Each product is written as a row-wise reduction, (W * x).sum(-1), which
inductor turns into a loop where each thread streams its own rows of W front
to back, faster on AMD CPUs than oneDNN's product; fusing the small ops
around the products cuts ~25 dispatched ops per layer to ~8, each of which
would start with cold caches after a weight stream. On Intel CPUs, whose
eager batch-1 products go to MKL (utils/decoding/linear.py), these kernels
are slower than the eager step, and kernels calling MKL were only level
with it: `--compile auto` does not use them there (`pays_off_here`);
`--compile on` still does. benchmarks/README.md has the measurements.

The kernels are compiled ahead of time once per model shape, CPU and torch,
and stored (utils/decoding/kernel_store.py); this module defines them,
describes the arguments they are compiled for, and runs a step through them.
Weights are the kernels' inputs, not constants, so one build serves every
model of a shape.

Only batch-1 steps of a float32 model on the CPU run here; prompts, batches,
beams, other dtypes, int8 and CUDA keep the eager path of utils/decoding/engine.py.
The sums run in another order than the eager path's, so logits differ in the
last bits; utils/decoding/compiling.py checks them against the eager path
before enabling.
"""
import weakref
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from utils.device import cpu_vendor

KERNEL_NAMES = ("first_input", "mlp_then_next_input", "mlp_then_logits")
# model -> (signature, {name: kernel}): the kernels its batch-1 steps run.
_ENABLED = weakref.WeakKeyDictionary()


def pays_off_here() -> bool:
    """Whether the compiled step can be expected to beat the eager one on
    this CPU (see the module's docstring): not on Intel CPUs."""
    return cpu_vendor() != "GenuineIntel"


def _gemv(x, w, b=None):
    """W x + b for one row x [K], W [N, K]: a row-wise reduction."""
    y = (w * x).sum(-1)
    return y if b is None else y + b


def kernel_functions(eps: float) -> Dict[str, callable]:
    """The step's kernels as plain functions, for layer norms with this
    epsilon (a constant in the kernels, not an input); the names are
    KERNEL_NAMES."""
    def norm(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def mlp(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2):
        x = x + _gemv(a, w_o, b_o)
        h = F.gelu(_gemv(norm(x, ln_w, ln_b), w1, b1), approximate="tanh")
        return x + _gemv(h, w2, b2)

    def first_input(x, ln_w, ln_b, w_qkv, b_qkv):
        return _gemv(norm(x, ln_w, ln_b), w_qkv, b_qkv)

    def mlp_then_next_input(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2,
                            next_ln_w, next_ln_b, next_w_qkv, next_b_qkv):
        x = mlp(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2)
        return x, _gemv(norm(x, next_ln_w, next_ln_b), next_w_qkv, next_b_qkv)

    def mlp_then_logits(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2,
                        final_ln_w, final_ln_b, w_out):
        x = mlp(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2)
        return _gemv(norm(x, final_ln_w, final_ln_b), w_out)

    return {"first_input": first_input, "mlp_then_next_input": mlp_then_next_input,
            "mlp_then_logits": mlp_then_logits}


def _block(x, a, layer):
    return (x, a, layer.o.weight, layer.o.bias, layer.ln2[1], layer.ln2[2],
            layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias)


def _next_input(layer):
    return layer.ln1[1], layer.ln1[2], layer.qkv.weight, layer.qkv.bias


def example_arguments(net) -> Dict[str, tuple]:
    """Arguments of each kernel as a step of `net` passes them (its own
    weights; zero activations), to compile the kernels for."""
    def activation():  # a fresh tensor each: compiled inputs must not alias
        return torch.zeros(net.n_embd, device=net.device, dtype=net.dtype)

    first, last = net.layers[0], net.layers[-1]
    return {"first_input": (activation(), *_next_input(first)),
            "mlp_then_next_input": (*_block(activation(), activation(), first),
                                    *_next_input(last)),
            "mlp_then_logits": (*_block(activation(), activation(), last),
                                net.final_ln[1], net.final_ln[2], net.out.weight)}


def signature(net) -> tuple:
    """What compiled kernels must have been built for to serve `net`: the
    epsilon, and each argument's shape, strides and dtype (compiled code
    indexes its inputs by the strides it was built for)."""
    arguments = example_arguments(net)
    return (net.final_ln[3],
            tuple((name, tuple((tuple(t.shape), t.stride(), str(t.dtype))
                               for t in arguments[name]))
                  for name in KERNEL_NAMES))


def unsupported_reason(net) -> Optional[str]:
    """Why the compiled step cannot serve this engine, or None."""
    if net.device.type != "cpu":
        return "it is a CPU path"
    if net.dtype != torch.float32:
        return "it is a float32 path"
    for layer in net.layers:
        linears = (layer.qkv, layer.o, layer.fc1, layer.fc2)
        if not all(isinstance(getattr(lin, "weight", None), torch.Tensor)
                   and lin.bias is not None for lin in linears):
            return "it needs float weights with biases (not --dtype int8)"
        if not getattr(layer.fc1, "gelu", False):
            return "it needs GPT-2's GELU feed-forward layer"
        if len({layer.ln1[3], layer.ln2[3], net.final_ln[3]}) != 1:
            return "it needs one layer-norm epsilon throughout"
    if not isinstance(getattr(net.out, "weight", None), torch.Tensor) or net.out.bias is not None:
        return "it needs GPT-2's output layer: float weights, no bias"
    return None


def enable(model, kernel_signature: tuple, kernels: Dict[str, callable]) -> None:
    """Engines built for `model` from now on take these kernels (built for
    `kernel_signature`) for their batch-1 steps."""
    _ENABLED[model] = (kernel_signature, kernels)


def disable(model) -> None:
    _ENABLED.pop(model, None)


def is_enabled(model) -> bool:
    return model in _ENABLED


def kernels_serving(model, net) -> Optional[Dict[str, callable]]:
    """The kernels enabled for `model` when they fit its engine `net` (the
    same signature), else None."""
    enabled = _ENABLED.get(model)
    if enabled is None or unsupported_reason(net) is not None:
        return None
    kernel_signature, kernels = enabled
    return kernels if signature(net) == kernel_signature else None


def next_logits(net, kernels, ids: torch.Tensor, positions: torch.Tensor, cache,
                start: int) -> torch.Tensor:
    """GPT2Net.next_logits for one token of one row ([1, 1] ids) with a cache:
    logits [1, V]."""
    H, hd, D = net.n_head, net.head_dim, net.n_embd
    x = (net.wte[ids.view(-1)] + net.wpe[positions.view(-1)]).view(D)
    layers = net.layers
    qkv = kernels["first_input"](x, *_next_input(layers[0]))
    end = start + 1
    for i, layer in enumerate(layers):
        q, k, v = qkv.view(3, 1, H, 1, hd).unbind(0)
        cache[0][i, :, :, start:end] = k
        cache[1][i, :, :, start:end] = v
        a = F.scaled_dot_product_attention(q, cache[0][i, :, :, :end],
                                           cache[1][i, :, :, :end]).view(D)
        if i + 1 < len(layers):
            x, qkv = kernels["mlp_then_next_input"](*_block(x, a, layer),
                                                    *_next_input(layers[i + 1]))
        else:
            return kernels["mlp_then_logits"](
                *_block(x, a, layer), net.final_ln[1], net.final_ln[2],
                net.out.weight).view(1, -1)
