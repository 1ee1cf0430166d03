"""What a decoding run may ask for: the value rules of the sampling settings,
the sample length against the model's positions, and the memory a batch or
beam needs (refused before it starts), with out-of-memory errors turned into
one line. gpt2_generate_main.py's flags, the training config's sample
settings, the server and `generation.generate` all check through here.
"""
import contextlib
import math
from typing import Dict, Optional

import torch

from utils.decoding.sampling import SMALLEST_TEMPERATURE
from utils.errors import UserError
from utils.memory import format_bytes, require_memory
from utils.model import parameter_count

# Upper bound for --batch_size and --beam_width: far beyond what any memory
# holds (the memory check refuses much less), it keeps size arithmetic sane.
MAX_ROWS = 2 ** 31 - 1
# Seeds, for sampling and training alike: numpy.random.seed takes no larger.
MAX_SEED = 2 ** 32 - 1
# texar's length penalty is ((5 + length) / 6) ** alpha: beyond this it
# overflows a float (or underflows to 0) for lengths within GPT-2's 1024.
LENGTH_PENALTY_LIMIT = 10.0
DECODING_STRATEGIES = ("greedy", "sample", "beam")
# Beyond these a divided score overflows float32, or the penalty changes nothing more.
REPETITION_PENALTY_RANGE = (0.01, 100.0)
GENERATION_MEMORY_FIX = ("use a smaller --batch_size, --beam_width or "
                         "--max_decoding_length, or --dtype bfloat16")



def check_decoding_values(strategy: str, temperature: float, top_k: int,
                          top_p: float, beam_width: int,
                          length_penalty: float) -> None:
    """One-line UserError for a decoding value that cannot work."""
    if strategy not in DECODING_STRATEGIES:
        raise UserError(f"unknown decoding strategy {strategy!r}: use one of "
                        f"{', '.join(DECODING_STRATEGIES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be > 0 (got {temperature}): a "
                        f"finite number such as 0.7; lower is more conservative")
    if temperature < SMALLEST_TEMPERATURE:
        raise UserError(f"--temperature {temperature} is too small to divide "
                        f"by in float32 (at least {SMALLEST_TEMPERATURE:.3g}): for "
                        f"the most likely token every time use --decoding_strategy "
                        f"greedy")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (got {top_k}); 0 disables it")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {top_p}); 1 disables it")
    if not 1 <= beam_width <= MAX_ROWS:
        raise UserError(f"--beam_width must be between 1 and {MAX_ROWS} "
                        f"(got {beam_width})")
    if not (math.isfinite(length_penalty) and abs(length_penalty) <= LENGTH_PENALTY_LIMIT):
        raise UserError(f"--length_penalty must be a number between "
                        f"-{LENGTH_PENALTY_LIMIT:g} and {LENGTH_PENALTY_LIMIT:g} "
                        f"(got {length_penalty}); 0 turns it off")


def check_penalty_and_stops(strategy: str, repetition_penalty: float,
                            stops: bool) -> None:
    """The repetition penalty's range, and that neither it nor stop texts
    (`stops`) go with beam search (the best beam is known only at the end)."""
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be > 0 (got "
                        f"{repetition_penalty}): 1 is off, 1.2 is common")
    low, high = REPETITION_PENALTY_RANGE
    if not low <= repetition_penalty <= high:
        raise UserError(f"--repetition_penalty must be between {low:g} and {high:g} (got "
                        f"{repetition_penalty:g}): beyond them the divided scores "
                        f"overflow or the penalty changes nothing more; 1 is off, 1.2 "
                        f"is common")
    if strategy == "beam" and (stops or repetition_penalty != 1):
        raise UserError("--stop_text and --repetition_penalty work with sampling and "
                        "greedy decoding, not beam search: drop them or choose "
                        "another --decoding_strategy")


def check_seed(seed: Optional[int], name: str = "--seed") -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be between 0 and {MAX_SEED} (got {seed})")


def check_length_fits(max_decoding_length: int, n_ctx: int,
                      setting: str = "--max_decoding_length") -> None:
    """The sample length, context included, must fit the model's positions."""
    if not 2 <= max_decoding_length <= n_ctx:
        raise UserError(f"{setting} must be between 2 and the model's {n_ctx} "
                        f"positions, its n_ctx (got {max_decoding_length})")


def check_context_room(subject: str, length: int, max_decoding_length: int,
                       fix: str) -> None:
    """A context must leave room for one new token within max_decoding_length.
    `subject` begins the message ('context 1 has', 'the prompt is')."""
    if length >= max_decoding_length:
        raise UserError(f"{subject} {length} tokens, leaving no room for a new token "
                        f"within max_decoding_length {max_decoding_length} (which "
                        f"counts the context): {fix}")


_SCORE_BYTES = {"sample": 40, "beam": 32, "greedy": 12}
# Bytes per prompt token per embedding unit and layer for the prompt pass:
# the hidden state, q/k/v, attention output and the 4x feed-forward.
_PROMPT_ACTIVATIONS = 16


def generation_memory(sizes: Dict[str, int], *, batch_size: int,
                      max_decoding_length: int, prompt_length: int,
                      strategy: str = "sample", beam_width: int = 1,
                      dtype: torch.dtype = torch.float32) -> Dict[str, int]:
    """Estimated peak bytes of `generate` on a model of GPT-2 `sizes`, by part.

    sizes: n_vocab, n_ctx, n_embd, n_head, n_layer (utils.model.model_size).
    batch_size contexts of up to `prompt_length` tokens each, continued to
    `max_decoding_length` tokens; beam search keeps beam_width rows per
    context. The estimate errs high by a little, never by orders of magnitude.
    """
    n_vocab, n_embd = sizes["n_vocab"], sizes["n_embd"]
    n_head, n_layer = sizes["n_head"], sizes["n_layer"]
    item = torch.empty((), dtype=dtype).element_size()
    beams = beam_width if strategy == "beam" else 1
    rows = batch_size * beams
    slots = max(max_decoding_length - 1, 1)
    params = parameter_count(sizes)
    cache = 2 * n_layer * rows * slots * n_embd * item
    if strategy == "beam":
        # Reordering the beams copies one of the two caches; the prompt's own
        # cache is copied to every beam.
        cache += cache // 2 + 2 * n_layer * batch_size * prompt_length * n_embd * item
        cache += rows * slots * 8 * 8  # int64 beam histories, alive and finished
    prompt = (batch_size * prompt_length * _PROMPT_ACTIVATIONS * n_embd * item
              + 2 * batch_size * n_head * prompt_length * prompt_length * 4)
    return {"weights": params * item,
            "key/value cache": cache,
            "next-token scores": rows * n_vocab * _SCORE_BYTES.get(strategy, 40),
            "prompt pass": prompt}


def require_generation_memory(sizes: Dict[str, int], *, batch_size: int,
                              max_decoding_length: int, prompt_length: int,
                              strategy: str = "sample", beam_width: int = 1,
                              dtype: torch.dtype = torch.float32,
                              device: Optional[torch.device] = None,
                              fix: str = "use a smaller --batch_size, --beam_width "
                                         "or --max_decoding_length",
                              model: Optional[str] = None) -> None:
    """UserError (one line, with the estimate by part) when generation cannot
    fit in `device`'s free memory. Call it before the weights are loaded: the
    model's `sizes` are enough; `model` names it in the message.
    """
    parts = generation_memory(sizes, batch_size=batch_size,
                              max_decoding_length=max_decoding_length,
                              prompt_length=prompt_length, strategy=strategy,
                              beam_width=beam_width, dtype=dtype)
    rows = batch_size * (beam_width if strategy == "beam" else 1)
    detail = ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items())
    with_model = f" with {model}" if model else ""
    require_memory(sum(parts.values()),
                   f"generating {rows} row(s) of up to {max_decoding_length} tokens"
                   f"{with_model} in {str(dtype).replace('torch.', '')} ({detail})",
                   fix, device)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure (CPU, CUDA or MPS), not a bug."""
    if isinstance(err, MemoryError):
        return True
    if not isinstance(err, RuntimeError):  # torch.OutOfMemoryError is one
        return False
    message = str(err).lower()
    return any(words in message for words in
               ("out of memory", "can't allocate memory", "not enough memory"))


@contextlib.contextmanager
def out_of_memory_as_user_error(what: str, fix: str):
    """Turn an allocation failure inside the block into a one-line UserError:
    "ran out of memory <what>: <fix>". Other errors pass through."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give back what the failed step held
        raise UserError(f"ran out of memory {what}: {fix}") from None
