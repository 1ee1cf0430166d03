"""The language-model arithmetic of training and evaluation.

The loss of an example of `length` tokens is the cross-entropy of
text_ids[start:length] given the tokens before each (teacher forcing), where
`start` is 1 for plain text and the context length (<|endoftext|> source
<|endoftext|>) for conditional data (utils/data/records.py): a source token is never
a target, and neither is padding. Also here: corpus-level dev evaluation (`evaluate`,
`EvalResult`), the learning-rate schedule (`lr_multiplier`) and mixed
precision (`autocast`).
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from tqdm import tqdm

from utils.data.records import PreparedSplit
from utils.training.fused_cross_entropy import cross_entropy_sum
from utils.processor import EOS_ID

IGNORE_INDEX = -100


def target_mask(lengths: torch.Tensor, width: int,
                starts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, width] True where position t predicts a target token.

    Position t predicts token t + 1, a target when starts <= t + 1 < length
    (starts: the first target token per row; 1, every token, when None).
    """
    positions = torch.arange(width, device=lengths.device)
    mask = positions[None, :] < (lengths[:, None] - 1)
    if starts is not None:
        mask &= positions[None, :] >= (starts.to(lengths.device)[:, None] - 1)
    return mask


def lm_nll(model, ids: torch.Tensor, lengths: torch.Tensor, per_token: bool = False,
           starts: Optional[torch.Tensor] = None):
    """Summed next-token NLL of a padded batch, and the number of targets.

    ids [B, T] (T = the longest example), lengths [B], starts [B] or None.
    Targets are ids[b, starts[b]:lengths[b]] (starts 1 when None). With
    per_token=True the sum is taken in float64 (for evaluation); otherwise
    it is a differentiable float32 scalar.
    """
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = target_mask(lengths, targets.size(1), starts)
    targets = targets.masked_fill(~mask, IGNORE_INDEX)
    logits = model(inputs=inputs, decoding_strategy="train_greedy").logits
    flat_logits = logits.reshape(-1, logits.size(-1))
    if per_token:
        nll = F.cross_entropy(flat_logits.float(), targets.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none")
        return nll.double().sum(), mask.sum()
    # Keeps the logits alone for backward, not their log-softmax too.
    nll = cross_entropy_sum(flat_logits, targets.reshape(-1), IGNORE_INDEX)
    return nll, mask.sum()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


@dataclass
class EvalResult:
    nll: float        # summed over every target token, in nats
    tokens: int       # target tokens
    examples: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)

    def describe(self, split: str = "dev") -> str:
        return (f"{split}: loss {self.loss:.6g} | perplexity {self.perplexity:.6g} | "
                f"{self.examples:,} examples | {self.tokens:,} tokens")


def evaluate(model, split: PreparedSplit, batch_size: int, device: torch.device,
             precision: str = "fp32", progress: bool = True,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[EvalResult]:
    """Corpus-level loss: exp(total NLL / total target tokens), not a batch mean.

    For conditional data the target tokens are the targets' (each with its
    closing <|endoftext|>), never the sources'.

    Batches group examples of similar length, so little is spent on padding.
    Returns None when `should_stop()` turns true before the end.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for indices in tqdm(split.batches_by_length(batch_size), desc="eval",
                                unit="batch", leave=False,
                                disable=None if progress else True):
                if should_stop is not None and should_stop():
                    return None
                ids, lengths = split.batch(indices, EOS_ID)
                ids, lengths = ids.to(device), lengths.to(device)
                starts = split.starts(indices).to(device) if split.conditional else None
                with autocast(precision, device):
                    nll, count = lm_nll(model, ids, lengths, per_token=True,
                                        starts=starts)
                total_nll += float(nll)
                total_tokens += int(count)
    finally:
        model.train(was_training)
    return EvalResult(total_nll, total_tokens, len(split))


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int,
                  decay: str, min_ratio: float) -> float:
    """Factor on the configured learning rate for optimizer step `step` (0-based).

    Linear warm-up from 1/warmup_steps to 1, then constant, or a linear or
    cosine decay reaching min_ratio at total_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def autocast(precision: str, device: torch.device):
    """bf16/fp16 autocast on the device; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
