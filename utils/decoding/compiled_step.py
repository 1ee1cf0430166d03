"""The batch-1 decoding step on the CPU as compiled kernels (torch.compile).

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
to back; on the 2-core dev machine that read the weights at ~28 GB/s where
oneDNN's product reached ~25. Fusing the small ops around the products cut
~25 dispatched ops per layer to ~8, and each op after a 10 MB weight stream
starts with cold caches. Measured together: 1.2-1.4x the eager step
(benchmarks/bench_generate.py, engines ours and ours_eager) on an AMD EPYC.
On an Intel Xeon (Sapphire Rapids) the eager step, whose batch-1 products go
to MKL there (utils/decoding/linear.py), was faster instead (26 vs 21
tokens/s), so `--compile auto` does not compile on Intel CPUs
(`pays_off_here`); `--compile on` still does.

Costs: inductor needs a C++ compiler and Python's headers. The first compile
takes ~15 s on a 2-core machine; later processes find the kernels in
inductor's on-disk cache and spend ~3 s loading torch's compiler stack.
Hence gpt2_generate_main.py --compile auto compiles only for sessions long
enough to repay it.

Only batch-1 steps of a float32 model on the CPU run here; prompts, batches,
beams, other dtypes, int8 and CUDA keep the eager path of utils/decoding/engine.py.
The sums run in another order than oneDNN's, so logits differ in the last
bits; the warm-up (utils/decoding/compiling.py) checks them against the eager path
before enabling.
"""
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from utils.device import cpu_vendor

_ENABLED = weakref.WeakSet()  # models whose batch-1 steps run compiled
_KERNELS = {}  # layer-norm epsilon -> {name: compiled function}


def pays_off_here() -> bool:
    """Whether the compiled step can be expected to beat the eager one on
    this CPU (see the module's docstring): not on Intel CPUs."""
    return cpu_vendor() != "GenuineIntel"


def _gemv(x, w, b):
    """W x + b for one row x [K], W [N, K]: a row-wise reduction."""
    y = (w * x).sum(-1)
    return y if b is None else y + b


def _make_kernels(eps: float):
    """The compiled kernels for layer norms with this epsilon (a constant in
    the kernels, not an input)."""
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
                        final_ln_w, final_ln_b, w_out, b_out):
        x = mlp(x, a, w_o, b_o, ln_w, ln_b, w1, b1, w2, b2)
        return _gemv(norm(x, final_ln_w, final_ln_b), w_out, b_out)

    return {name: torch.compile(fn, dynamic=False, fullgraph=True)
            for name, fn in (("first_input", first_input),
                             ("mlp_then_next_input", mlp_then_next_input),
                             ("mlp_then_logits", mlp_then_logits))}


def _kernels(eps: float):
    if eps not in _KERNELS:
        _KERNELS[eps] = _make_kernels(eps)
    return _KERNELS[eps]


def is_enabled(model) -> bool:
    return model in _ENABLED


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
    return None


def mark_enabled(model) -> None:
    """Engines built for `model` from now on take the compiled step."""
    _ENABLED.add(model)


def mark_disabled(model) -> None:
    _ENABLED.discard(model)


def kernels_for(net) -> dict:
    """Compile (or fetch) the kernels for `net`'s layer-norm epsilon."""
    return _kernels(net.final_ln[3])


def next_logits(net, ids: torch.Tensor, positions: torch.Tensor, cache,
                start: int) -> torch.Tensor:
    """GPT2Net.next_logits for one token of one row ([1, 1] ids) with a cache:
    logits [1, V]."""
    kernels = _KERNELS[net.final_ln[3]]
    H, hd, D = net.n_head, net.head_dim, net.n_embd
    x = (net.wte[ids.view(-1)] + net.wpe[positions.view(-1)]).view(D)
    layers = net.layers
    first = layers[0]
    qkv = kernels["first_input"](x, first.ln1[1], first.ln1[2],
                                 first.qkv.weight, first.qkv.bias)
    end = start + 1
    for i, layer in enumerate(layers):
        q, k, v = qkv.view(3, 1, H, 1, hd).unbind(0)
        cache[0][i, :, :, start:end] = k
        cache[1][i, :, :, start:end] = v
        a = F.scaled_dot_product_attention(q, cache[0][i, :, :, :end],
                                           cache[1][i, :, :, :end]).view(D)
        block = (x, a, layer.o.weight, layer.o.bias, layer.ln2[1], layer.ln2[2],
                 layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias)
        if i + 1 < len(layers):
            following = layers[i + 1]
            x, qkv = kernels["mlp_then_next_input"](
                *block, following.ln1[1], following.ln1[2],
                following.qkv.weight, following.qkv.bias)
        else:
            return kernels["mlp_then_logits"](
                *block, net.final_ln[1], net.final_ln[2],
                net.out.weight, net.out.bias).view(1, -1)
