"""A model loaded for decoding, as gpt2_generate_main.py and gpt2_serve_main.py
load it: the device its --device and --dtype ask for, its resolved weights on
that device, frozen and prepared for the engine, and the compiled step when
asked for."""
import sys

import torch

from utils.checkpoints.weights import load_weights
from utils.decoding import compiled_step
from utils.decoding.compiling import (freeze_garbage_collector, has_stored_kernels,
                                      timed_compile_step)
from utils.decoding.engine import prepare_for_decoding
from utils.decoding.int8_linear import require_int8
from utils.decoding.limits import out_of_memory_as_user_error
from utils.decoding.load_targets import target_for
from utils.device import resolve_device
from utils.errors import UserError
from utils.processor import get_encoder

DECODING_DTYPES = ("float32", "bfloat16", "float16", "int8")


def decoding_device(dtype: str, device_flag: str) -> torch.device:
    """The device --device asks for, refused when it cannot run --dtype."""
    int8 = dtype == "int8"
    # int8 is a CPU path: --device auto means the CPU for it.
    device = (torch.device("cpu") if int8 and device_flag == "auto"
              else resolve_device(device_flag))
    if int8:
        require_int8(device)
    if (dtype == "bfloat16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise UserError("this GPU has no bfloat16 support: use --dtype float16")
    return device


def load_for_decoding(resolved, dtype: str, device: torch.device, long_session: bool = True):
    """(model, encoder): the resolved weights on `device` in `dtype`, frozen
    for generation and prepared for the engine (utils/decoding/engine.py).

    On the CPU in float32 or int8 the weights land where decoding reads them
    as they load (utils/decoding/load_targets.py): no second copy. Adapters
    (a LoRA checkpoint) merge into float weights, so their base loads plainly.
    Only a `long_session` puts the weights in huge pages: their first touch
    can wait on the kernel's memory compaction for longer than a short run's
    whole decoding gains from them (utils/decoding/weight_arena.py)."""
    int8 = dtype == "int8"
    in_place = (device.type == "cpu" and dtype in ("float32", "int8")
                and resolved.adapters is None)
    loaded = load_weights(resolved, target_for(int8, long_session) if in_place else None)
    encoder = get_encoder(loaded.vocab_dir)
    with out_of_memory_as_user_error(f"moving the model to {device}",
                                     "use --dtype bfloat16 or a smaller model"):
        model = loaded.model
        if not in_place:
            float_dtype = "float32" if int8 else dtype
            model = model.to(device=device, dtype=getattr(torch, float_dtype))
        # Generation only: frozen, so its weights may move into huge pages in
        # reading order (utils/decoding/weight_arena.py).
        model.requires_grad_(False)
        prepare_for_decoding(model, int8=int8, huge_pages=long_session)
    print(f"Loaded {loaded.source} on {device} ({dtype}).", file=sys.stderr)
    return model, encoder


def turn_on_compiled_step(model, mode: str, worth_building: bool = True) -> None:
    """--compile on/auto: the batch-1 step through compiled kernels
    (utils/decoding/compiling.py), loaded from the kernel store, or compiled
    and stored first when none are there and the run is `worth_building`
    (always with `on`); saying so on stderr. A failure is an error with `on`,
    a note (and the eager step) with `auto`. `auto` does nothing on a CPU
    where the compiled step is not the faster one (compiled_step.pays_off_here)."""
    if mode == "auto" and not compiled_step.pays_off_here():
        return
    build = mode == "on" or worth_building
    stored = has_stored_kernels(model)
    if not stored and not build:
        return
    if not stored:
        print("Compiling the decoding step for this model shape, CPU and torch (once: "
              "about a minute; later runs load it in a fraction of a second)...",
              file=sys.stderr, flush=True)
    reason, seconds = timed_compile_step(model, build)
    if reason is None:
        freeze_garbage_collector()
        print(f"Compiled decoding step ready in {seconds:.2f} s.", file=sys.stderr)
    elif mode == "on":
        raise UserError(f"--compile on: {reason}; use --compile off")
    else:
        print(f"note: decoding uncompiled: {reason} (--compile off skips trying)",
              file=sys.stderr)
