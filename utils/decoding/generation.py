"""Fast text generation with texar's GPT2Decoder: its own modules and weights.

texar's built-in inference feeds even the prompt one token per step and
re-stacks the whole key/value cache at every step. This engine runs the same
parameters (read from the model's submodules, never copied) the way GPT-2 is
usually served:

1. Prefill: the whole prompt batch goes through the network in one forward
   pass, filling a key/value cache [layers, batch, heads, slots, head_dim]
   that is allocated once and written in place.
2. Decode: one token per row per step; each step writes one cache slot and
   attends over the slots so far with scaled_dot_product_attention.

Prompts of different lengths share a batch by LEFT padding: every prompt ends
at the same cache slot, padding slots are masked out of attention, and each
row gets its own position ids, so every row sees exactly the positions and
keys it would see decoded alone.

Counting follows the original Texar example: `max_decoding_length` counts the
prompt too, so a prompt of L tokens gets at most max_decoding_length - L new
tokens. (texar's own `model(context=..., max_decoding_length=M)` returns M + 1
tokens in all: call it with M - 1 for the same count.)

Strategies: "greedy" (argmax), "sample" (temperature, top-k, top-p; see
utils/decoding/sampling.py), "beam" (texar's beam search with its length penalty
((5 + len) / 6) ** alpha, best beam returned).
"""
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from utils.errors import UserError
from utils.decoding.engine import GPT2Net as _GPT2, engine_for
from utils.decoding.limits import (check_context_room, check_decoding_values, check_length_fits,
                                   check_penalty_and_stops)
from utils.decoding.sampling import filter_logits, sample_from_logits

# texar's beam search marks impossible scores with -1e7, not -inf; kept so
# that ties and orderings come out the same.
_BEAM_INF = 1.0e7


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits [B, T, V] of token ids [B, T] (the prefill pass).

    Equals texar's `model(inputs=ids, decoding_strategy='train_greedy').logits`
    up to float rounding.
    """
    net = engine_for(model)
    with torch.inference_mode():
        ids = ids.to(net.device)
        positions = torch.arange(ids.size(1), device=net.device).expand_as(ids)
        return net.logits(net.hidden(ids, positions, None, 0, None))


def next_token_logits(model: nn.Module, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Logits [B, V] of the token after each context (lengths may differ).

    One batched, left-padded prefill pass: the same one `generate` starts
    with. Each row equals running its context alone, up to float rounding.
    """
    contexts = [[int(t) for t in context] for context in contexts]
    net = engine_for(model)
    _check_token_ids(net, contexts)
    for i, context in enumerate(contexts):
        if len(context) > net.n_ctx:
            raise UserError(f"context {i} has {len(context)} tokens, more than the "
                            f"model's {net.n_ctx} positions (n_ctx): shorten it")
    if not contexts:
        return torch.empty(0, net.n_vocab, device=net.device, dtype=net.dtype)
    with torch.inference_mode():
        batch = PaddedBatch(net, contexts, 1, max(len(c) for c in contexts))
        return net.next_logits(batch.ids, batch.positions, None, 0, batch.prefill_mask)


class PaddedBatch:
    """Left-padded prompts: where each row's tokens, positions and valid slots are."""

    def __init__(self, net: _GPT2, contexts: List[List[int]], rows_per_context: int,
                 slots: int):
        device = net.device
        lengths = [len(c) for c in contexts]
        self.width = max(lengths)  # the prompt part of the cache
        pads = [self.width - n for n in lengths]
        ids = torch.zeros(len(contexts), self.width, dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, pads[row]:] = torch.tensor(context, dtype=torch.long)
        r = rows_per_context
        self.ids = ids.to(device).repeat_interleave(r, dim=0)
        self.lengths = torch.tensor(lengths, device=device).repeat_interleave(r)
        pad = torch.tensor(pads, device=device).repeat_interleave(r)
        slot = torch.arange(self.width, device=device)
        self.positions = (slot - pad[:, None]).clamp_(min=0)
        self.padded = any(pads)
        self.n_ctx = net.n_ctx
        # valid[b, s]: cache slot s of row b holds a real token (not padding).
        self.valid = (torch.arange(slots, device=device)[None, :] >= pad[:, None])
        if self.padded:
            causal = torch.ones(self.width, self.width, dtype=torch.bool,
                                device=device).tril_()
            # A padding query attends to itself only, so no row of the
            # softmax is empty (an empty row would give NaN keys downstream).
            self.prefill_mask = ((causal & self.valid[:, None, :self.width])
                                 | torch.eye(self.width, dtype=torch.bool,
                                             device=device))[:, None]
        else:
            self.prefill_mask = None

    def step_mask(self, end: int) -> Optional[torch.Tensor]:
        return self.valid[:, None, None, :end] if self.padded else None

    def step_positions(self, step: int) -> torch.Tensor:
        """Positions [B, 1] of the tokens fed at decoding step `step` (0-based).

        Rows that are already done may run past the model's positions; their
        outputs are discarded, so they are clamped to stay in range.
        """
        return (self.lengths + step).clamp_(max=self.n_ctx - 1)[:, None]


def _check_arguments(net: _GPT2, contexts: List[List[int]], max_decoding_length: int,
                     strategy: str, temperature: float, top_k: int, top_p: float,
                     beam_width: int, length_penalty: float) -> None:
    """The rules the scripts' flags follow (utils.flags), applied to a caller's
    arguments, and the contexts' tokens and lengths."""
    check_decoding_values(strategy, temperature, top_k, top_p, beam_width,
                          length_penalty)
    check_length_fits(max_decoding_length, net.n_ctx)
    _check_token_ids(net, contexts)
    for i, context in enumerate(contexts):
        check_context_room(f"context {i} has", len(context), max_decoding_length,
                           f"raise --max_decoding_length (at most {net.n_ctx}) or "
                           f"shorten the prompt")


def _check_token_ids(net: _GPT2, contexts: List[List[int]]) -> None:
    for i, context in enumerate(contexts):
        if not context:
            raise UserError(f"context {i} is empty: give at least one token "
                            f"(e.g. <|endoftext|>) to start from")
        bad = [t for t in context if not 0 <= t < net.n_vocab]
        if bad:
            raise UserError(f"context {i} holds token id {bad[0]}, outside the "
                            f"model's vocabulary of {net.n_vocab}: check the "
                            f"tokenizer matches the model")


def generate(model: nn.Module, contexts: Sequence[Sequence[int]],
             max_decoding_length: int, *,
             strategy: str = "sample",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             beam_width: int = 4, length_penalty: float = 0.0,
             end_token: int = 50256,
             generator: Optional[torch.Generator] = None,
             on_tokens: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
             repetition_penalty: float = 1.0,
             stop_check: Optional[Callable[[torch.Tensor, torch.Tensor],
                                           torch.Tensor]] = None,
             ) -> List[List[int]]:
    """Continue each context with the model; returns the new ids per context.

    model: a texar GPT2Decoder (utils.model.build_model); used as it is, on
        its device and dtype, without dropout and without gradients.
    contexts: token ids per prompt; lengths may differ.
    max_decoding_length: total length, context included: context i gets at
        most max_decoding_length - len(contexts[i]) new tokens. At most the
        model's n_ctx.
    strategy: "greedy", "sample" (temperature, then top_k, then top_p, as
        texar's helpers filter) or "beam" (beam_width, length_penalty alpha
        as in texar: scores are divided by ((5 + len) / 6) ** alpha).
    end_token: a row stops when it produces this id (default <|endoftext|>);
        an id outside the vocabulary (e.g. -1) never occurs, so every row
        runs to its length limit.
    generator: the torch.Generator samples are drawn from (the global RNG
        when None); the same seed gives the same samples.
    on_tokens: called after every decoding step with new_ids [B] (LongTensor)
        and done [B] (BoolTensor). A row that has finished, at this step or
        earlier, shows end_token (even when it stopped at its length limit,
        the limit-reaching token itself is shown with done=True); so
        "new_ids[b] != end_token" means row b has a new token to print. Not
        supported with strategy="beam" (the best beam is known only at the
        end): passing it raises ValueError.

    Returns one list per context: the continuation only (no context), cut
    before the first end_token, which is not included.
    Raises UserError (one line) for arguments a user can fix.
    """
    contexts = [[int(t) for t in context] for context in contexts]
    net = engine_for(model)
    _check_arguments(net, contexts, max_decoding_length, strategy, temperature,
                     top_k, top_p, beam_width, length_penalty)
    if not contexts:
        return []
    check_penalty_and_stops(strategy, repetition_penalty, stop_check is not None)
    if strategy == "beam":
        if on_tokens is not None:
            raise ValueError("on_tokens (streaming) is not supported with beam "
                             "search: the best beam is known only at the end")
        with torch.inference_mode():
            return _beam_search(net, contexts, max_decoding_length, beam_width,
                                length_penalty, end_token)
    with torch.inference_mode():
        return _decode(net, contexts, max_decoding_length, strategy == "greedy",
                       temperature, top_k, top_p, end_token, generator, on_tokens,
                       repetition_penalty, stop_check)


def _decode(net: _GPT2, contexts: List[List[int]], max_decoding_length: int,
            greedy: bool, temperature: float, top_k: int, top_p: float,
            end_token: int, generator: Optional[torch.Generator],
            on_tokens, repetition_penalty: float = 1.0,
            stop_check=None) -> List[List[int]]:
    """Greedy or sampled decoding of a batch of prompts."""
    device = net.device
    lengths = [len(c) for c in contexts]
    room = torch.tensor([max_decoding_length - n for n in lengths], device=device)
    steps = max_decoding_length - min(lengths)  # for the row with most room
    width = max(lengths)
    slots = width + steps - 1  # the last new token is never fed back
    batch = PaddedBatch(net, contexts, 1, slots)
    cache = net.new_cache(len(contexts), slots)
    out = torch.full((len(contexts), steps), end_token, dtype=torch.long,
                     device=device)
    done = torch.zeros(len(contexts), dtype=torch.bool, device=device)
    end = torch.tensor(end_token, device=device)

    # every prompt ends at the last slot
    logits = net.next_logits(batch.ids, batch.positions, cache, 0, batch.prefill_mask)
    seen = _seen_tokens(contexts, net.n_vocab, device) if repetition_penalty != 1 else None
    rows = torch.arange(len(contexts), device=device)
    for step in range(steps):
        if seen is not None:
            logits = penalize_repetition(logits, seen, repetition_penalty)
        if greedy:
            tokens = torch.argmax(logits, dim=-1)
        else:
            tokens = sample_from_logits(
                filter_logits(logits, temperature=temperature, top_k=top_k,
                              top_p=top_p), generator)
        # Finished rows show end_token; they are still fed what they drew (a
        # real id, whatever end_token is) and their outputs are ignored.
        shown = torch.where(done, end, tokens)
        out[:, step] = shown
        done |= (shown == end) | (room <= step + 1)
        if stop_check is not None:
            done |= stop_check(shown, done).to(device)
        if seen is not None:
            seen[rows, tokens] = True
        if on_tokens is not None:
            on_tokens(shown, done)
        if step + 1 == steps or bool(done.all()):
            break
        slot = width + step
        logits = net.next_logits(tokens[:, None], batch.step_positions(step), cache,
                                 slot, batch.step_mask(slot + 1))
    return [_cut(row, end_token) for row in out.tolist()]


def _seen_tokens(contexts: List[List[int]], n_vocab: int,
                 device: torch.device) -> torch.Tensor:
    """Bool [B, V]: True for the tokens of each row's context."""
    seen = torch.zeros(len(contexts), n_vocab, dtype=torch.bool, device=device)
    for row, context in enumerate(contexts):
        seen[row, torch.tensor(context, device=device)] = True
    return seen


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor,
                        penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty: the logits of `seen` tokens divided
    by `penalty` when positive, multiplied when negative (each token once)."""
    logits = logits.float()
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _cut(ids: List[int], end_token: int) -> List[int]:
    return ids[:ids.index(end_token)] if end_token in ids else ids


def _beam_search(net: _GPT2, contexts: List[List[int]], max_decoding_length: int,
                 beam_width: int, alpha: float, end_token: int) -> List[List[int]]:
    """texar's beam search (texar.torch.utils.beam_search), per context.

    Each context's result equals texar's beam search run on that context
    alone: alive beams grow to the 2*W best extensions, the W best that did
    not end stay alive, the W best that ended (scored log p / ((5+n)/6)**alpha,
    n counting the end token) are kept as finished. A context stops after its
    max_decoding_length - len(context) steps or once its best finished score
    beats what its best alive beam could still reach. The result is the best
    finished beam, or the best alive one when none finished.

    The KV cache is preallocated as for sampling; the small per-beam token
    histories grow by one column per step, as in texar.
    """
    device = net.device
    B, W, V = len(contexts), beam_width, net.n_vocab
    lengths = [len(c) for c in contexts]
    decode_len = torch.tensor([max_decoding_length - n for n in lengths],
                              device=device)
    steps = max_decoding_length - min(lengths)
    width = max(lengths)
    slots = width + steps - 1
    rows = torch.arange(B, device=device)[:, None]

    logits, batch, cache = _prefill_beams(net, contexts, W, slots)
    # Only beam 0 is live at first (the others start at log p = -inf, as in texar).
    alive_logp = torch.full((B, W), float("-inf"), device=device)
    alive_logp[:, 0] = 0.0
    alive_seq = torch.zeros(B, W, 0, dtype=torch.long, device=device)
    fin_seq = torch.zeros(B, W, 0, dtype=torch.long, device=device)
    fin_scores = torch.full((B, W), -_BEAM_INF, device=device)
    fin_flags = torch.zeros(B, W, dtype=torch.bool, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    results: List[Optional[List[int]]] = [None] * B

    for step in range(steps):
        log_probs = torch.log_softmax(logits, dim=-1) + alive_logp[:, :, None]
        penalty = ((5.0 + float(step + 1)) / 6.0) ** alpha
        scores = (log_probs / penalty).view(B, W * V)
        top_scores, top_ids = torch.topk(scores, 2 * W)
        top_logp = top_scores * penalty
        parent, token = top_ids // V, top_ids % V
        top_seq = torch.cat([alive_seq[rows, parent], token[:, :, None]], dim=2)
        ended = token == end_token

        # The W best candidates that did not end stay alive.
        _, pick = torch.topk(top_scores + ended.float() * -_BEAM_INF, W)
        alive_seq = top_seq[rows, pick]
        alive_logp = top_logp[rows, pick]
        new_tokens = token[rows, pick]
        beam_parent = parent[rows, pick]

        fin_seq, fin_scores, fin_flags = _keep_best_finished(
            fin_seq, fin_scores, fin_flags, top_seq, top_scores, ended)

        # texar's stopping test, per context.
        max_penalty = ((5.0 + decode_len.float()) / 6.0) ** alpha
        bound_met = fin_scores.max(dim=1).values > alive_logp[:, 0] / max_penalty
        stop = active & (bound_met | (decode_len <= step + 1))
        for b in torch.nonzero(stop).flatten().tolist():
            best = fin_seq[b, 0] if bool(fin_flags[b].any()) else alive_seq[b, 0]
            results[b] = _cut(best.tolist(), end_token)
        active &= ~stop
        if not bool(active.any()):
            break

        # Reorder the cache to follow each surviving beam's parent, then feed
        # the beams' new tokens.
        src = (rows * W + beam_parent).flatten()
        slot = width + step
        cache[0][:, :, :, :slot] = cache[0][:, src, :, :slot]
        cache[1][:, :, :, :slot] = cache[1][:, src, :, :slot]
        positions = (batch.lengths + step).clamp_(max=net.n_ctx - 1)[:, None]
        logits = net.next_logits(new_tokens.reshape(B * W, 1), positions, cache, slot,
                                 batch.step_mask(slot + 1)).float().view(B, W, V)
    return results  # type: ignore[return-value]


def _prefill_beams(net: _GPT2, contexts: List[List[int]], beam_width: int, slots: int):
    """(first logits [B, W, V], batch, cache) for W beams per context.

    All W beams of a context start from the same prompt: it runs once per
    context, then its keys and values are copied to the W beams.
    """
    B, W, width = len(contexts), beam_width, max(len(c) for c in contexts)
    prompts = PaddedBatch(net, contexts, 1, width)
    prompt_cache = net.new_cache(B, width)
    logits = net.next_logits(prompts.ids, prompts.positions, prompt_cache, 0,
                             prompts.prefill_mask).float().repeat_interleave(W, dim=0)
    batch = PaddedBatch(net, contexts, W, slots)
    cache = net.new_cache(B * W, slots)
    for part, prompt_part in zip(cache, prompt_cache):
        part[:, :, :, :width] = prompt_part.repeat_interleave(W, dim=1)
    return logits.view(B, W, net.n_vocab), batch, cache


def _keep_best_finished(fin_seq, fin_scores, fin_flags, top_seq, top_scores, ended):
    """The W best of (finished so far, this step's candidates that ended)."""
    B, W = fin_scores.shape
    rows = torch.arange(B, device=fin_scores.device)[:, None]
    fin_seq = torch.cat([fin_seq, fin_seq.new_zeros(B, W, 1)], dim=2)
    all_seq = torch.cat([fin_seq, top_seq], dim=1)
    all_scores = torch.cat(
        [fin_scores, top_scores + (~ended).float() * -_BEAM_INF], dim=1)
    all_flags = torch.cat([fin_flags, ended], dim=1)
    _, pick = torch.topk(all_scores, W)
    return all_seq[rows, pick], all_scores[rows, pick], all_flags[rows, pick]


# ---------------------------------------------------------------------------
# Memory: refuse what cannot fit up front; report allocation failures in one line

# Bytes per (row, vocabulary entry) of next-token scores at one decoding step,
# measured on CPU with a little to spare: sampling holds several float32
# copies (temperature, top-k/top-p filters, probabilities, a sort's int64
# indices), beam search a few (log-softmax, scores, copies per beam), greedy
# the logits and an argmax.
