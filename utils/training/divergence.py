"""Stopping a training run whose loss, weights or dev loss are no longer finite.

A diverged run saves nothing: not model.ckpt, not model_best.ckpt, not a
metrics line. Finite weights can still be diverged (an update to ~1e30 at the
last step is finite, but the next forward overflows), so before a checkpoint
is saved the updated model's loss on one training batch must be finite too
(`batch_loss`), and a dev loss that is not finite stops the run like a
training loss.

Reading a flag from the accelerator after every step would cost a sync per
step. Instead each step's loss updates a marker kept on the device (the first
step whose loss was not finite), read one step late between steps (nothing has
to wait for the step just queued) and exactly before every display,
evaluation and save. Every rank reads it in the same collective, so all ranks
stop at the same step; the error names the step, the loss, what was kept on
disk and the likely cause.
"""
import os
from typing import Optional, Tuple

import torch

from utils.training import distributed as dist_utils
from utils.errors import UserError
from utils.training.lm import autocast, lm_nll


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; nothing of it was saved."""


class DivergenceWatch:
    """The first step whose loss was not finite (-1: none yet) and that loss,
    kept on the device; `_bad_step_before` is the marker one step earlier."""

    def __init__(self, device: torch.device):
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self._bad_loss = torch.zeros((), device=device)
        self._bad_step_before = self._bad_step

    def note_loss(self, loss: torch.Tensor, step: int) -> None:
        """Remember `step` if its loss is the first not finite (device ops only)."""
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step_before = self._bad_step
        self._bad_step = self._bad_step.masked_fill(first, step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)

    def agree(self, ctx, exact: bool, model_bad: bool = False,
              interrupt: bool = False) -> Tuple[bool, bool]:
        """(diverged, interrupted) as all ranks see them: whether any rank saw a
        non-finite loss (up to this step if `exact`, else up to the previous
        one) or a diverged model (`model_bad`: weights, a batch's loss or the
        dev loss not finite), and whether any rank got the Ctrl-C flag
        `interrupt`. One collective; all ranks call it."""
        marker = self._bad_step if exact else self._bad_step_before
        flags = torch.tensor([float(int(marker) >= 0), float(model_bad),
                              float(interrupt)], dtype=torch.float64)
        flags = dist_utils.all_reduce_sum(flags, ctx)
        return bool(flags[0] > 0 or flags[1] > 0), bool(flags[2] > 0)

    def what_went_wrong(self, ctx, model_problem: str) -> str:
        """The earliest non-finite training loss over all ranks, or
        `model_problem` (what the model check found) when no training loss
        was (a collective: all ranks call it)."""
        table = torch.zeros(ctx.world_size, 2, dtype=torch.float64)
        table[ctx.rank, 0] = float(self._bad_step)
        table[ctx.rank, 1] = float(self._bad_loss)
        # Each rank fills its own row; the sum gives every rank the whole table.
        seen = [(int(s), l) for s, l in dist_utils.all_reduce_sum(table, ctx).tolist()
                if s >= 0]
        if seen:
            bad_step, loss = min(seen)
            return f"the loss at step {bad_step} is {loss} (not finite)"
        return model_problem


def weights_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all())


def batch_loss(model: torch.nn.Module, batch, precision: str,
               device: torch.device) -> float:
    """The per-token loss of `model` on `batch` (ids, lengths, starts or None),
    without dropout or gradients, as evaluation computes it."""
    ids, lengths, starts = batch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(precision, device):
            nll, count = lm_nll(model, ids.to(device), lengths.to(device),
                                per_token=True,
                                starts=None if starts is None else starts.to(device))
    finally:
        model.train(was_training)
    return float(nll) / max(int(count), 1)


def what_was_kept(last_path: str, last_saved_step: Optional[int]) -> str:
    """What the training checkpoint on disk holds now that nothing more is saved."""
    if last_saved_step is not None:
        return (f"nothing after step {last_saved_step} was saved ({last_path} "
                f"holds step {last_saved_step})")
    if os.path.exists(last_path):
        return f"nothing was saved: {last_path} is left as it was"
    return "nothing was saved"


def likely_cause(precision: str, peak_lr: float, config_name: str) -> str:
    if precision == "fp16":
        return ("float16 overflow (precision 'fp16'): use precision 'bf16' or "
                "'fp32' in the training config, or a lower lr")
    return (f"a learning rate too high for this model (peak lr {peak_lr:g} in "
            f"{config_name}): lower it, lengthen warmup_steps or clip "
            f"gradients (gradient_clip max_norm)")
