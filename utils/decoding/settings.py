"""The sampling settings of a run (from gpt2_generate_main.py's flags or a
training config), checked once: lengths, values and memory."""
import dataclasses
from typing import Any, Dict, Mapping, Optional

import torch

from utils.decoding.limits import (GENERATION_MEMORY_FIX, check_context_room,
                                   check_decoding_values, check_length_fits, check_seed,
                                   require_generation_memory)
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The sampling flags, checked once; top_k's default settled."""
    max_decoding_length: Optional[int]   # None: the caller's default
    strategy: str
    temperature: float
    top_k: int
    top_p: float
    beam_width: int
    length_penalty: float
    seed: Optional[int]
    batch_size: int = 1                  # rows generated together
    dtype: str = "float32"               # the weights' precision while generating
    # Where the user sets max_decoding_length, for messages.
    length_setting: str = "--max_decoding_length"

    @classmethod
    def from_flags(cls, args, **extra) -> "SamplingSettings":
        """Check the flags of add_sampling_args (and --seed) before a model is
        loaded. --top_k defaults to 40, or to 0 when --top_p is given (as in
        the original example, top-p then replaces top-k)."""
        top_k = args.top_k if args.top_k is not None else (0 if args.top_p < 1 else 40)
        check_decoding_values(args.decoding_strategy, args.temperature, top_k,
                              args.top_p, args.beam_width, args.length_penalty)
        check_seed(args.seed)
        if args.max_decoding_length is not None and args.max_decoding_length < 2:
            raise UserError(f"--max_decoding_length must be at least 2 "
                            f"(got {args.max_decoding_length})")
        return cls(max_decoding_length=args.max_decoding_length,
                   strategy=args.decoding_strategy, temperature=args.temperature,
                   top_k=top_k, top_p=args.top_p, beam_width=args.beam_width,
                   length_penalty=args.length_penalty, seed=args.seed, **extra)

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)

    def check_lengths(self, n_ctx: int, longest_context: int) -> None:
        """Refuse a sample length the model's `n_ctx` positions cannot hold,
        or one that leaves the longest context no room for a new token."""
        check_length_fits(self.max_decoding_length, n_ctx, self.length_setting)
        check_context_room("the longest context has", longest_context,
                           self.max_decoding_length,
                           f"raise {self.length_setting} (at most {n_ctx}) or "
                           f"shorten the contexts")

    def check_memory(self, sizes: Mapping[str, int], longest_context: int, device,
                     model: Optional[str] = None) -> None:
        """Refuse, from the model's `sizes` (known before its weights are
        read), a batch or beam that `device`'s free memory cannot hold
        (utils.decoding.limits.generation_memory); `model` names it."""
        require_generation_memory(
            sizes, batch_size=self.batch_size,
            max_decoding_length=self.max_decoding_length,
            prompt_length=longest_context, strategy=self.strategy,
            beam_width=self.beam_width, dtype=getattr(torch, self.dtype),
            device=device, fix=GENERATION_MEMORY_FIX, model=model)

    def generate_kwargs(self) -> Dict[str, Any]:
        """utils.decoding.generation.generate's keyword arguments for these settings."""
        return dict(strategy=self.strategy, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, beam_width=self.beam_width,
                    length_penalty=self.length_penalty)
