"""Turning the compiled batch-1 step (utils/decoding/compiled_step.py) on for
a model: check that it applies, compile and warm it up, and keep it only
when it agrees with the eager step. gpt2_generate_main.py's --compile.
"""
import gc
import time
from typing import Optional, Tuple

import torch

from utils.decoding import compiled_step
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


def switch(model, on: bool) -> None:
    """Route `model`'s batch-1 steps through the compiled kernels, or not."""
    (compiled_step.mark_enabled if on else compiled_step.mark_disabled)(model)
    engine_for(model).compiled = on


def compile_step(model) -> Optional[str]:
    """Compile the batch-1 step for `model` and turn it on: None when on, or
    a one-line reason it is not (the eager path stays in use)."""
    reason = compiled_step.unsupported_reason(engine_for(model))
    if reason is not None:
        return reason
    context = list(WARM_UP_CONTEXT)
    try:
        eager = step_logits(model, context)
        switch(model, True)
        compiled_step.kernels_for(engine_for(model))
        generate(model, [context], len(context) + 2, strategy="greedy", end_token=-1)
        compiled = step_logits(model, context)
    except Exception as err:  # a missing compiler, headers, or an inductor bug
        switch(model, False)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"torch.compile failed: {first[:200]}"
    if not torch.allclose(compiled, eager, rtol=1e-3, atol=1e-3):
        switch(model, False)
        return "the compiled kernels disagreed with the eager step"
    return None


def timed_compile_step(model) -> Tuple[Optional[str], float]:
    """compile_step() and the seconds it took."""
    start = time.perf_counter()
    reason = compile_step(model)
    return reason, time.perf_counter() - start


def freeze_garbage_collector() -> None:
    """Collect once, then exempt every object alive now from later collections.

    torch's compiler stack leaves ~400k objects that live as long as the
    process; every full garbage collection would walk them all, stalling a
    decoding step by tens of ms. For the whole process: call it once, from
    the command that compiled, after compiling."""
    gc.collect()
    gc.freeze()
