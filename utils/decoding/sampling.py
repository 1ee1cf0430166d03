"""Turn next-token logits into the next token: greedy, or sampled after filtering.

The filters reproduce texar-pytorch's sampling helpers exactly
(`TopKSampleEmbeddingHelper`, `TopPSampleEmbeddingHelper` in
texar.torch.modules.decoders.decoder_helpers), so a model samples from the same
distributions here as it would through texar:

- temperature: logits are divided by it first;
- top-k: every logit below the k-th largest becomes -inf. Logits EQUAL to the
  k-th largest are kept, so ties can leave more than k candidates;
- top-p (nucleus): sort descending, take the cumulative softmax; drop the
  tokens whose cumulative probability is above p, except the first one that
  crosses p (it is kept) and the most likely token (always kept). Ties are
  ordered by `torch.sort(descending=True)`, the call texar makes.

texar offers top-k or top-p, never both; here both may be given and top-k runs
first, then top-p over the survivors. top_k=0 and top_p=1 switch a filter off
(texar's helper with p=1.0 could still drop a few far-tail tokens whose
cumulative sum rounds above 1.0; here p=1.0 drops nothing).

Sampling draws with `torch.multinomial(probs, 1, replacement=True)`, the draw
texar's `Categorical(logits=...).sample()` makes, through the caller's
`torch.Generator` when one is given (the global RNG otherwise).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from utils.errors import UserError

# Logits are divided by the temperature in float32: below float32's smallest
# normal number the divisor itself is rounded (1e-45 becomes 1.4e-45, 1e-46
# becomes 0), so smaller temperatures are refused.
SMALLEST_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """`logits` [B, V] with everything below the k-th largest set to -inf (0 = off)."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logits` [B, V] outside the nucleus of probability `top_p` set to -inf (1 = off)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    # A token goes when the tokens before it already hold more than top_p; the
    # shift keeps the first token that crosses the threshold, and the top one.
    drop = torch.zeros_like(cumulative, dtype=torch.bool)
    drop[..., 1:] = cumulative[..., :-1] > top_p
    return logits.scatter(-1, sorted_ids,
                          sorted_logits.masked_fill(drop, float("-inf")))


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p; returns new float32 logits [B, V].

    The input is not modified. Filtered-out tokens hold -inf, so
    `softmax(filter_logits(...))` is the distribution that is sampled.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = divide_by_temperature(logits, temperature)
    if 0 < top_k < logits.size(-1) and top_p < 1.0:
        # Both filters: run top-p on the k survivors only (already sorted by
        # topk), which spares sorting the whole vocabulary every step.
        values, ids = torch.topk(logits, top_k, dim=-1)
        keep = logits >= values[..., -1:]
        if int(keep.sum(-1).max()) == top_k:  # no ties at the k-th value
            kept = top_p_filter(values, top_p)
            return torch.full_like(logits, float("-inf")).scatter(-1, ids, kept)
        logits = logits.masked_fill(~keep, float("-inf"))
        return top_p_filter(logits, top_p)
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def divide_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits / temperature`, without overflowing to inf for a tiny temperature.

    A row whose quotient overflows float32 (e.g. logits near 100 at
    temperature 1e-37) would turn into NaN probabilities; such rows are
    divided after subtracting their largest logit instead, which gives the
    same distribution (the limit: all mass on the top tokens). Other rows are
    divided as texar does, so its draws are reproduced exactly.
    """
    scaled = logits / temperature
    shifted = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    overflowed = torch.isposinf(scaled).any(dim=-1, keepdim=True)
    return torch.where(overflowed, shifted, scaled)


def sample_from_logits(logits: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id per row of (already filtered) `logits` [B, V] -> [B].

    Draws on the generator's device (so a CPU generator also serves a CUDA
    model) and returns the ids on the logits' device.
    """
    probs = F.softmax(logits.float(), dim=-1)
    # torch.multinomial fails on NaN (on CUDA with a device-side assert that
    # ends the process), so check first. Only a model whose outputs overflow
    # or are NaN gets here: filtered logits always keep at least one token.
    if not bool(torch.isfinite(probs).all()):
        raise UserError("the model gave next-token scores that are not finite "
                        "(NaN or inf): its weights may be corrupt, or 16-bit "
                        "activations overflowed (try --dtype float32)")
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    ids = torch.multinomial(probs, 1, replacement=True, generator=generator)
    return ids.squeeze(-1).to(logits.device)
