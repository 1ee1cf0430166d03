"""How one row of the shared batch picks its next token: its own sampling
settings, penalties, logit bias and random generator.

The order is the CLI's (utils/decoding/generation.py): the repetition penalty first
(Hugging Face's, over the prompt and the tokens so far), then OpenAI's
presence and frequency penalties (over the completion so far:
logit - count * frequency - (count > 0) * presence), then logit_bias; then
greedy argmax (temperature 0) or temperature, top-k, top-p and one draw
(utils/decoding/sampling.py). Each row draws from its own torch.Generator: with a
seed, choice 0 is seeded with it, so a lone choice samples what
`gpt2_generate_main.py --seed S --batch_size 1` samples with the same
settings, and choice i > 0 with a seed derived from (S, i); without one,
from fresh entropy. Log-probabilities are the model's own (log-softmax of
its logits, before penalties, bias and temperature).
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from utils.decoding.generation import penalize_repetition
from utils.decoding.sampling import filter_logits, sample_from_logits
from utils.serving.request import Sampling


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request seeded with `seed`."""
    if choice == 0:
        return seed
    return int(np.random.SeedSequence([seed, choice]).generate_state(1, np.uint64)[0])


class RowSampler:
    """Next tokens for one row."""

    def __init__(self, sampling: Sampling, seed: Optional[int], context: List[int],
                 n_vocab: int, device: torch.device):
        self.sampling = sampling
        self.generator = torch.Generator()  # CPU: draws are the same on any device
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        s = sampling
        self.seen = self.counts = self.bias = None
        if s.repetition_penalty != 1.0:
            self.seen = torch.zeros(n_vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(context, device=device)] = True
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(n_vocab, device=device)
        if s.logit_bias:
            self.bias = torch.zeros(n_vocab, device=device)
            ids, values = zip(*s.logit_bias)
            self.bias[torch.tensor(ids, device=device)] = torch.tensor(
                values, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the model's logits as they are (a whole batch at once)."""
        return (self.sampling.greedy and self.seen is None and self.counts is None
                and self.bias is None)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token after logits [1, V] (the model's, unchanged)."""
        s = self.sampling
        if self.seen is not None:
            logits = penalize_repetition(logits, self.seen, s.repetition_penalty)
        if self.counts is not None:
            logits = (logits.float() - self.counts * s.frequency_penalty
                      - (self.counts > 0).float() * s.presence_penalty)
        if self.bias is not None:
            logits = logits.float() + self.bias
        if s.greedy:
            return int(torch.argmax(logits, dim=-1))
        filtered = filter_logits(logits, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p)
        return int(sample_from_logits(filtered, self.generator))

    def chosen(self, token: int) -> None:
        """Note `token` as generated (for the penalties)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1


def top_logprobs(logits: torch.Tensor, token: int, k: int, token_text
                 ) -> Tuple[float, Dict[str, float]]:
    """(log-probability of `token`, the k most likely tokens' text -> theirs)
    under the model's distribution logits [V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: Dict[str, float] = {}
    if k:
        values, ids = torch.topk(logp, k)
        for value, i in zip(values.tolist(), ids.tolist()):
            top.setdefault(token_text(i), value)
    return float(logp[token]), top
