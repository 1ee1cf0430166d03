"""Turning the compiled batch-1 step (utils/decoding/compiled_step.py) on for
a model: check that it applies, load its kernels from the store (or build and
store them, utils/decoding/kernel_store.py), warm it up, and keep it only
when it agrees with the eager step. gpt2_generate_main.py's --compile.
"""
import gc
import sys
import time
from typing import Optional, Tuple

import torch

from utils.decoding import compiled_step, kernel_store
from utils.decoding.engine import engine_for
from utils.decoding.generation import generate

# The warm-up context: two tokens, so the step reads a filled cache slot.
WARM_UP_CONTEXT = (0, 1)


def step_logits(model, context) -> torch.Tensor:
    """Logits of one decoding step after `context` (a batch-1 step with a
    cache, so the compiled path runs when enabled)."""
    net = engine_for(model)
    with torch.inference_mode():
        cache = net.new_cache(1, len(context) + 1)
        ids = torch.tensor([context], device=net.device)
        positions = torch.arange(len(context), device=net.device)[None]
        net.hidden(ids[:, :-1], positions[:, :-1], cache, 0, None)  # fills the cache
        return net.next_logits(ids[:, -1:], positions[:, -1:], cache,
                               len(context) - 1, None).clone()


def _switch(model, kernel_signature=None, kernels=None) -> None:
    """Route `model`'s batch-1 steps through `kernels`, or (None) not."""
    if kernels is None:
        compiled_step.disable(model)
    else:
        compiled_step.enable(model, kernel_signature, kernels)
    net = engine_for(model)
    net.step_kernels = compiled_step.kernels_serving(model, net)


def has_stored_kernels(model) -> bool:
    """Whether the store holds kernels for `model`'s batch-1 step (a private
    store only: an untrusted one counts as none)."""
    net = engine_for(model)
    if compiled_step.unsupported_reason(net) is not None:
        return False
    try:
        return kernel_store.stored_kernels_dir(compiled_step.signature(net)) is not None
    except kernel_store.StoreProblem:
        return False


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _kernels_for(net, build: bool):
    """(signature, kernels or None, reason or None): the stored kernels for
    `net`, built and stored first when missing and `build` is set."""
    kernel_signature = compiled_step.signature(net)
    try:
        kernels = kernel_store.load(kernel_signature)
        if kernels is None and build:
            kernel_store.build(kernel_signature,
                               compiled_step.kernel_functions(kernel_signature[0]),
                               compiled_step.example_arguments(net))
            kernels = kernel_store.load(kernel_signature)
    except kernel_store.StoreProblem as err:
        return kernel_signature, None, str(err)
    except Exception as err:  # a missing compiler, headers, or a compiler bug
        return kernel_signature, None, f"compiling failed: {_first_line(err)}"
    if kernels is None:
        return kernel_signature, None, "no compiled kernels are stored for this model yet"
    return kernel_signature, kernels, None


def compile_step(model, build: bool = True) -> Optional[str]:
    """Turn the compiled batch-1 step on for `model`, its kernels loaded from
    the store (with `build`, compiled and stored first when missing): None
    when on, or a one-line reason it is not (the eager path stays in use)."""
    net = engine_for(model)
    reason = compiled_step.unsupported_reason(net)
    if reason is not None:
        return reason
    kernel_signature, kernels, reason = _kernels_for(net, build)
    if reason is not None:
        return reason
    context = list(WARM_UP_CONTEXT)
    try:
        eager = step_logits(model, context)
        _switch(model, kernel_signature, kernels)
        generate(model, [context], len(context) + 2, strategy="greedy", end_token=-1)
        compiled = step_logits(model, context)
    except Exception as err:
        _switch(model)
        return f"the compiled kernels failed: {_first_line(err)}"
    if not torch.allclose(compiled, eager, rtol=1e-3, atol=1e-3):
        _switch(model)
        return "the compiled kernels disagreed with the eager step"
    return None


def timed_compile_step(model, build: bool = True) -> Tuple[Optional[str], float]:
    """compile_step() and the seconds it took."""
    start = time.perf_counter()
    reason = compile_step(model, build)
    return reason, time.perf_counter() - start


def freeze_garbage_collector() -> None:
    """Collect once, then exempt every object alive now from later collections.

    torch's compiler stack leaves ~400k objects that live as long as the
    process; every full garbage collection would walk them all, stalling a
    decoding step by tens of ms. For the whole process: call it once, from
    the command that compiled, after compiling. Without the compiler
    imported (kernels loaded from the store) there is nothing to do."""
    if "torch._inductor" not in sys.modules:
        return
    gc.collect()
    gc.freeze()
