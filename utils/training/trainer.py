"""The fine-tuning loop of gpt2_train_main.py: the Trainer and what it keeps.

Each optimizer step's loss (utils/training/lm.py defines the per-token loss) is

    (sum of token NLL over the step's examples, on every rank and in every
     accumulated micro-batch) / (number of those target tokens)

so gradient accumulation and data parallelism give the same update as one big
batch. Every rank computes its own NLL sum; the token count is summed over
ranks first, and the loss is multiplied by the world size because DDP averages
gradients over ranks.

A training checkpoint (`output_dir/model.ckpt`) holds everything to continue
exactly where it stopped: model, optimizer, loss scaler, learning-rate schedule,
step, epoch and position inside it, and the random-number states of every rank.
It is written atomically and loads with `torch.load(weights_only=True)`.
It also records the training config it ran with: a resumed run takes every
setting from the config given now, optimizer settings included, and names
each one that changed (utils/training/resume_settings.py).
The best dev perplexity's weights go to `output_dir/model_best.ckpt`, and every
display and evaluation to `output_dir/metrics.jsonl`.

A loss that is not finite (training or dev), or a model that is not (its
weights, or its loss on a training batch just before a save), stops training
with TrainingDiverged before anything of it is logged or saved: checkpoints
on disk keep their last good versions (utils/training/divergence.py watches without a
sync per step). With a final evaluation (--do_eval), model.ckpt is saved after
it, so it carries the true best dev perplexity. The optimizer comes from
utils/training/optimizer.py, the memory options (gradient checkpointing, frozen
embeddings) from utils/training/memory_options.py, the random-number states from
utils/training/rng_state.py, the metrics file from utils/training/metrics_log.py.
"""
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from itertools import islice
from tqdm import tqdm

from utils.training import distributed as dist_utils
from utils.data.records import PAD_INDEX, PreparedSplit, ShardSampler
from utils.training.divergence import (DivergenceWatch, TrainingDiverged, batch_loss,
                                       likely_cause, weights_finite, what_was_kept)
from utils.errors import UserError
from utils.training.lm import EvalResult, autocast, evaluate, lm_nll, lr_multiplier, perplexity
from utils.training.memory_options import apply_memory_options, trainable_parameter_count
from utils.training.metrics_log import MetricsLog
from utils.fused_attention import set_attention
from utils.fused_gelu import set_gelu
from utils.training.compiled_forward import compile_forward
from utils.model import has_memory
from utils.training.optimizer import build_optimizer, optimizer_type
from utils.processor import EOS_ID, get_encoder
from utils.training.resume_settings import (apply_optimizer_settings, changed_optimizer_settings,
                                            changed_settings, config_snapshot, describe_changes,
                                            optimizer_settings)
from utils.training.rng_state import gather_rng_states, restore_rng_states, seed_new_run
from utils.training.config import TrainConfig, lora_of
from utils.training.lora_training import LoraRun
from utils.training import sharding
from utils.lora import merged_view
from utils.samples.during_training import SAMPLES_LOG, write_training_samples
from utils.checkpoints.weights import (BEST_CHECKPOINT, CHECKPOINT_FORMAT, LAST_CHECKPOINT,
                                       checkpoint_model_fields, save_checkpoint)

METRICS_LOG = "metrics.jsonl"
# Every file a training run writes into its output directory.
TRAINING_OUTPUTS = (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_LOG, SAMPLES_LOG)


# ---------------------------------------------------------------------------
# Ctrl-C: finish the step, save, then stop

class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks between steps.

    The current step finishes so the checkpoint is consistent; a second Ctrl-C
    stops at once (the last checkpoint on disk stays whole: writes are atomic).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving a checkpoint "
              "(press Ctrl-C again to quit without saving).", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving; the message says where."""


# ---------------------------------------------------------------------------
# The trainer

class Trainer:
    """Trains `model` on a prepared split; one code path for 1 or W processes.

    model: the plain GPT2Decoder, already on ctx.device (wrapped here).
    resume: the training state from a checkpoint (everything but "model"),
        or None to start at step 0.
    """

    def __init__(self, model, model_hparams: Dict[str, Any], cfg: TrainConfig, ctx,
                 train_split: PreparedSplit, dev_split: Optional[PreparedSplit],
                 output_dir: str, resume: Optional[Dict[str, Any]] = None,
                 stop_after_steps: Optional[int] = None, progress: bool = True,
                 lora_base: Optional[Tuple[str, str]] = None):
        self.cfg, self.ctx = cfg, ctx
        # Checkpoints store the model's sizes as plain numbers, never texar hparams.
        self.model_hparams = model_hparams
        self.model_fields = checkpoint_model_fields(model_hparams, has_memory(model))
        self.train_split, self.dev_split = train_split, dev_split
        self.output_dir = output_dir
        self.stop_after_steps = stop_after_steps
        self.progress = progress and ctx.is_main
        self.device = ctx.device
        self.encoder = get_encoder() if cfg.sample_steps > 0 else None

        self.plain_model = model
        model.train()
        # Adapters (and the frozen base) before the memory options, DDP and the
        # optimizer: they all see only the trainable parameters.
        self.lora = LoraRun.start(model, lora_of(cfg), lora_base, resume, cfg.seed)
        apply_memory_options(model, cfg.gradient_checkpointing, cfg.trainable)
        set_gelu(set_attention(model, cfg.attention), cfg.attention)
        if cfg.compile:
            compile_forward(model)
        if self.lora is not None:
            ctx.print(f"{self.lora.settings.describe()}: "
                      f"{trainable_parameter_count(model):,} trainable parameters, the "
                      f"base frozen.", file=sys.stderr)
        self.sharded = cfg.shard_model
        if self.sharded:
            sharding.check_can_shard(ctx, model, self.lora)
            self.model = sharding.shard(model, ctx, cfg.precision)
        else:
            self.model = dist_utils.wrap_model(model, ctx)
        self.optimizer, self.clip_grad, self.scaler = build_optimizer(
            model, cfg.opt, cfg.precision, self.device, sharded=self.sharded)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]

        self.sampler = ShardSampler(len(train_split), ctx.rank, ctx.world_size, cfg.seed)
        examples_per_rank = math.ceil(len(train_split) / ctx.world_size)
        self.steps_per_epoch = math.ceil(
            examples_per_rank / (cfg.train_batch_size * cfg.gradient_accumulation_steps))
        if cfg.max_steps > 0:  # the steps decide; epochs run on as far as needed
            self.total_steps = cfg.max_steps
            self.epochs = math.ceil(cfg.max_steps / self.steps_per_epoch)
        else:
            self.total_steps = self.steps_per_epoch * cfg.max_train_epoch
            self.epochs = cfg.max_train_epoch
        # The step this run stops at (unless early stopping or Ctrl-C): the
        # TOTAL of the log's step N/TOTAL.
        self.end_step = (self.total_steps if stop_after_steps is None
                         else min(self.total_steps, stop_after_steps))

        self.step = 0             # optimizer steps done
        self.epoch = 0            # the epoch in progress
        self.examples_done = 0    # of this epoch's global order
        self.best_dev_ppl: Optional[float] = None
        self.evals_since_best = 0  # for early_stopping_patience
        self.last_eval: Optional[EvalResult] = None
        self.last_eval_step: Optional[int] = None
        self.window = LossWindow(self.device)  # training loss since the last display
        self.last_saved_step: Optional[int] = None  # model.ckpt written by this run
        self.divergence = DivergenceWatch(self.device)
        if resume is not None:
            self._load_state(resume)
        else:
            seed_new_run(cfg.seed, ctx.rank)
        self.clock = _RunClock(self.step)  # restarted when training starts
        self.log = MetricsLog(os.path.join(output_dir, METRICS_LOG),
                              self.step if resume is not None else None,
                              enabled=ctx.is_main, tensorboard_dir=cfg.tensorboard_dir)

    # -- state -----------------------------------------------------------

    def state_dict(self, rng: Dict[str, Any], window_nll: float = 0.0) -> Dict[str, Any]:
        """Everything to continue exactly; `window_nll` is the display window's
        loss summed over all ranks. In a sharded run the model's and the
        optimizer's tensors are this rank's shards (DTensors): _write gathers
        them."""
        return {
            "format": CHECKPOINT_FORMAT,
            **self._weights(),
            **self.model_fields,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": optimizer_type(self.optimizer),
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "schedule": {"base_lrs": self.base_lrs, "warmup_steps": self.cfg.warmup_steps,
                         "total_steps": self.total_steps, "lr_decay": self.cfg.lr_decay,
                         "min_lr_ratio": self.cfg.min_lr_ratio},
            "step": self.step,
            "epoch": self.epoch,
            "examples_done_in_epoch": self.examples_done,
            "rng": rng,
            "best_dev_ppl": self.best_dev_ppl,
            "evals_since_best": self.evals_since_best,
            "last_eval_step": self.last_eval_step,
            "last_eval": dataclasses.asdict(self.last_eval) if self.last_eval else None,
            "display_window": {"nll": window_nll, "tokens": self.window.tokens},
            "data": self._data_settings(),
            "config": config_snapshot(self.cfg),
        }

    def _weights(self) -> Dict[str, Any]:
        """The model's entries of a checkpoint: its state dict, or a LoRA run's
        adapters and base record (utils/lora.py)."""
        if self.lora is not None:
            return self.lora.checkpoint_fields(self.plain_model)
        return {"model": self.plain_model.state_dict()}

    def _write(self, path: str, state) -> None:
        """Save the checkpoint `state()` builds: rank 0 writes; in a sharded run
        every rank calls (each tensor is gathered from all of them as it is
        written), otherwise only rank 0 needs to."""
        if self.sharded:
            sharding.save_gathered(path, state(), self.ctx)
        elif self.ctx.is_main:
            save_checkpoint(path, state())

    def _data_settings(self) -> Dict[str, Any]:
        """What decides the order and grouping of the training examples."""
        return {"train_examples": len(self.train_split),
                "train_batch_size": self.cfg.train_batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "world_size": self.ctx.world_size, "seed": self.cfg.seed}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError("the --checkpoint was not written by this version of "
                            "gpt2_train_main.py, so training cannot resume from it")
        saved_type, mine = state.get("optimizer_type"), optimizer_type(self.optimizer)
        if saved_type is not None and saved_type != mine:
            raise UserError(f"the --checkpoint was trained with {saved_type} but "
                            f"{self.cfg.name} configures {mine}: resume with the same "
                            f"optimizer type, or leave out --checkpoint to start anew")
        # The config's optimizer settings, which load_state_dict replaces.
        configured = optimizer_settings(self.optimizer)
        try:
            if self.sharded:
                sharding.load_full_optimizer_state(self.plain_model, self.optimizer,
                                                   state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"the optimizer state in the --checkpoint does not fit "
                            f"the optimizer of {self.cfg.name} ({type(err).__name__}: "
                            f"{err}): resume with the same opt settings, or leave out "
                            f"--checkpoint to start anew") from None
        apply_optimizer_settings(self.optimizer, configured)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.examples_done = int(state["examples_done_in_epoch"])
        self.best_dev_ppl = state.get("best_dev_ppl")
        self.evals_since_best = int(state.get("evals_since_best") or 0)
        self.last_eval_step = state.get("last_eval_step")
        if state.get("last_eval"):
            self.last_eval = EvalResult(**state["last_eval"])
        window = state.get("display_window")
        if window:  # the first display after resuming covers the same steps
            self.window.tokens = float(window["tokens"])
            if self.ctx.is_main:  # displays sum nll over ranks: count it once
                self.window.nll += float(window["nll"])
        notes = []
        saved = state.get("data", {})
        now = self._data_settings()
        if state.get("config"):
            # The data settings are named (and explained) in the next note.
            changes = changed_settings(state["config"], config_snapshot(self.cfg),
                                       leave_out=tuple(now))
        else:  # an older checkpoint: its optimizer groups say what it used
            changes = changed_optimizer_settings(
                state["optimizer"].get("param_groups"), configured)
        if changes:
            notes.append(describe_changes(changes))
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items()
                   if saved.get(k) != v]
        if changed:
            notes.append("settings differ from the checkpoint's ("
                         + ", ".join(changed) + "): training continues, but not "
                                                "exactly as an uninterrupted run")
        if state["schedule"].get("total_steps") != self.total_steps:
            notes.append(f"the learning-rate schedule now spans {self.total_steps} "
                         f"steps (was {state['schedule'].get('total_steps')})")
        if self.examples_done > len(self.train_split):
            self.examples_done = len(self.train_split)
        if not restore_rng_states(state["rng"], self.ctx):
            torch.manual_seed(self.cfg.seed + self.ctx.rank + self.step)
            notes.append("random states were saved for another world size or device: "
                         "dropout is reseeded")
        for note in notes:
            self.ctx.print(f"note: {note}", file=sys.stderr)

    def save(self, path: str) -> None:
        """Write a full training checkpoint (rank 0 writes; all ranks call).

        Never a diverged one: TrainingDiverged instead, and `path` keeps the
        last good checkpoint."""
        self._stop_if_diverged(exact=True, check_weights=True, probe=True)
        rng = gather_rng_states(self.ctx)
        nll = dist_utils.all_reduce_sum(
            self.window.nll.detach().reshape(1).double().cpu(), self.ctx)
        self._write(path, lambda: self.state_dict(rng, float(nll[0])))
        dist_utils.barrier(self.ctx)
        self.last_saved_step = self.step

    # -- loop ------------------------------------------------------------

    def train(self, final_eval: bool = False) -> None:
        """Train until max_train_epoch (or --stop_after_steps, or Ctrl-C).

        With `final_eval` (--do_eval) the final model is evaluated before the
        last save, so that model.ckpt holds the true best dev perplexity and a
        later resume compares against it."""
        cfg = self.cfg
        last_path = os.path.join(self.output_dir, LAST_CHECKPOINT)
        done = None
        if self.step >= self.total_steps or self.epoch >= self.epochs:
            done = (f"Training already complete: step {self.step} of "
                    f"{self.total_steps} (raise max_train_epoch or max_steps to train "
                    f"more).")
        elif self.stop_after_steps is not None and self.step >= self.stop_after_steps:
            done = (f"Already at step {self.step}, not before --stop_after_steps "
                    f"{self.stop_after_steps}: nothing to train.")
        if done:
            self.ctx.print(done)
            if final_eval and self._final_eval_owed():  # the checkpoint's run had none
                self.evaluate_and_track()
                self.save(last_path)
            return
        self.ctx.print(dist_utils.describe(self.ctx, cfg.train_batch_size,
                                        cfg.gradient_accumulation_steps))
        span = (f"max_steps {cfg.max_steps}" if cfg.max_steps > 0
                else f"{cfg.max_train_epoch} epochs")
        self.ctx.print(f"{len(self.train_split):,} training examples, "
                    f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps "
                    f"in all ({span})"
                    + (f"; stopping at step {self.end_step} (--stop_after_steps)"
                       if self.end_step < self.total_steps else "")
                    + (f"; resuming at step {self.step} (epoch {self._epochs_done():.2f})"
                       if self.step else "") + ".")
        self.clock = _RunClock(self.step)
        bar = tqdm(total=self.end_step, initial=self.step, unit="step",
                   desc="train", dynamic_ncols=True,
                   disable=None if self.progress else True)
        window = self.window
        window.start, window.timed_tokens = time.perf_counter(), 0.0
        stopped_by = None
        with StopRequest() as stop, dist_utils.peer_failure_guard(self.ctx):
            if self._eval_owed():  # due at the checkpoint's step, cut short by Ctrl-C
                self.evaluate_and_track(should_stop=stop)
            for epoch in range(self.epoch, self.epochs):
                if epoch != self.epoch:
                    self.epoch, self.examples_done = epoch, 0
                self.sampler.set_epoch(epoch)
                self.sampler.set_start(self.examples_done)
                for group in _step_groups(iter(self.sampler), cfg.train_batch_size,
                                          cfg.gradient_accumulation_steps):
                    self._train_step(group, window)
                    self.step += 1
                    self.examples_done = min(
                        len(self.train_split),
                        self.examples_done + self.ctx.world_size * sum(map(len, group)))
                    bar.update(1)
                    stopped_by = self._after_step(window, bar, stop, last_path)
                    if not stopped_by and cfg.max_steps > 0 and self.step >= self.total_steps:
                        stopped_by = "max_steps"  # mid-epoch: the position is kept
                    if stopped_by:
                        break
                if stopped_by:
                    break
            else:
                self.epoch, self.examples_done = self.epochs, 0
            bar.close()
            if final_eval and stopped_by != "interrupt" and self._final_eval_owed():
                self.evaluate_and_track(should_stop=stop)
                if self._stop_if_diverged(exact=True, interrupt=stop()):
                    stopped_by = "interrupt"  # during the evaluation: it stays owed
            self.save(last_path)
        if stopped_by == "interrupt":
            self.ctx.print(f"Interrupted at step {self.step}: saved {last_path}. Continue "
                        f"with --do_train --checkpoint {last_path}.", file=sys.stderr)
            raise TrainingInterrupted
        if stopped_by == "early_stopping":
            self.ctx.print(f"Stopped at step {self.step}: no better dev perplexity in "
                        f"{cfg.early_stopping_patience} evaluations "
                        f"(early_stopping_patience); the best model is "
                        f"{os.path.join(self.output_dir, BEST_CHECKPOINT)}.")
        elif stopped_by == "stop_after_steps":
            self.ctx.print(f"Stopped at step {self.step} (--stop_after_steps); saved "
                        f"{last_path}. Continue with --do_train --checkpoint {last_path}.")
        else:
            self.ctx.print(f"Training done: {self.step} steps in "
                           f"{_clock_time(self.clock.elapsed())}; saved {last_path}.")

    def _train_step(self, group: List[List[int]], window: "LossWindow") -> None:
        """One optimizer step over `group` (micro-batches of example indices)."""
        ctx, cfg = self.ctx, self.cfg
        batches = [self._batch(ix) for ix in group]
        local_tokens = sum(int((lengths - starts).sum()) for _, lengths, starts in batches)
        tokens = dist_utils.all_reduce_sum(
            torch.tensor([local_tokens], dtype=torch.float64), ctx)
        scale = ctx.world_size / float(tokens[0])

        multiplier = lr_multiplier(self.step, warmup_steps=cfg.warmup_steps,
                                   total_steps=self.total_steps, decay=cfg.lr_decay,
                                   min_ratio=cfg.min_lr_ratio)
        for group_, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group_["lr"] = base_lr * multiplier

        step_nll = torch.zeros((), device=self.device)
        for i, (ids, lengths, starts) in enumerate(batches):
            ids = ids.to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
            # Plain text needs no starts: every token after the first counts.
            starts = (starts.to(self.device, non_blocking=True)
                      if self.train_split.conditional else None)
            with dist_utils.maybe_no_sync(self.model, sync=i == len(batches) - 1):
                with autocast(cfg.precision, self.device):
                    nll, _ = lm_nll(self.model, ids, lengths, starts=starts)
                loss = nll * scale
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_nll += nll.detach().float()

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            self.clip_grad(parameters=self.plain_model.parameters())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        window.add(step_nll, float(tokens[0]))
        self.divergence.note_loss(step_nll / float(tokens[0]), self.step + 1)

    # -- divergence ------------------------------------------------------

    def _stop_if_diverged(self, exact: bool, check_weights: bool = False,
                          probe: bool = False, interrupt: bool = False,
                          problem: Optional[str] = None) -> bool:
        """Raise TrainingDiverged when any rank saw a non-finite loss (up to
        this step if `exact`, else up to the previous one, which needs no wait
        for the step just queued), or a diverged model: `problem` (what the
        caller found, e.g. the dev loss), or with `check_weights` a non-finite
        weight, or with `probe` a non-finite loss on a training batch. Also
        agrees on the Ctrl-C flag `interrupt` in the same collective: True
        when any rank was interrupted. All ranks call it."""
        if problem is None and (check_weights or probe):
            problem = self._model_problem(probe)
        diverged, interrupted = self.divergence.agree(self.ctx, exact,
                                                      problem is not None, interrupt)
        if diverged:
            what = self.divergence.what_went_wrong(
                self.ctx, problem or f"the model diverged at step {self.step}")
            kept = what_was_kept(os.path.join(self.output_dir, LAST_CHECKPOINT),
                                 self.last_saved_step)
            cause = likely_cause(self.cfg.precision, max(self.base_lrs), self.cfg.name)
            raise TrainingDiverged(f"training stopped: {what}; {kept}. Likely cause: {cause}")
        return interrupted

    def _model_problem(self, probe: bool) -> Optional[str]:
        """Why the current model counts as diverged, or None: a weight that is
        not finite, or (with `probe`) a loss on the first training batch that
        is not, although every weight is (an update to ~1e30 overflows)."""
        if not weights_finite(self.plain_model):
            return f"the weights are no longer finite after step {self.step}"
        if probe:
            first = list(range(min(len(self.train_split), self.cfg.train_batch_size)))
            ids, lengths, starts = self._batch(first)
            loss = batch_loss(self.plain_model,
                              (ids, lengths, starts if self.train_split.conditional else None),
                              self.cfg.precision, self.device)
            if not math.isfinite(loss):
                return (f"after step {self.step} the loss on the first training batch "
                        f"is {loss} (not finite: the weights overflow)")
        return None

    def _batch(self, indices: List[int]):
        """(ids, lengths, target starts) of a padded batch; sampler padding
        slots become rows with no targets (length 1), so a rank still runs its
        step without counting an example twice."""
        real = [i for i in indices if i != PAD_INDEX]
        empty = len(indices) - len(real)
        if real:
            ids, lengths = self.train_split.batch(real, EOS_ID)
            starts = self.train_split.starts(real)
        else:  # width 2: the model needs at least one input position
            ids, lengths, starts = (torch.empty(0, 2, dtype=torch.int64),
                                    torch.empty(0, dtype=torch.int64),
                                    torch.empty(0, dtype=torch.int64))
        if not empty:
            return ids, lengths, starts
        ids = torch.cat([ids, torch.full((empty, ids.size(1)), EOS_ID, dtype=ids.dtype)])
        lengths = torch.cat([lengths, torch.ones(empty, dtype=lengths.dtype)])
        starts = torch.cat([starts, torch.ones(empty, dtype=starts.dtype)])
        return ids, lengths, starts

    def _after_step(self, window: "LossWindow", bar, stop: StopRequest,
                    last_path: str) -> Optional[str]:
        """Display, evaluate, checkpoint; the reason to stop, if any."""
        cfg, step = self.cfg, self.step
        display_due = cfg.display_steps > 0 and step % cfg.display_steps == 0
        eval_due = (cfg.eval_steps > 0 and step % cfg.eval_steps == 0
                    and self.dev_split is not None)
        save_due = cfg.checkpoint_steps > 0 and step % cfg.checkpoint_steps == 0
        sample_due = cfg.sample_steps > 0 and step % cfg.sample_steps == 0
        if display_due or eval_due or sample_due:
            # Never log, evaluate or sample a diverged model (all ranks agree).
            self._stop_if_diverged(exact=True, check_weights=eval_due, probe=sample_due)
        if display_due:
            self._display(window, bar)
        paused = time.perf_counter()  # evaluation and saving do not count in tok/s
        if eval_due:
            self.evaluate_and_track(should_stop=stop)
        if sample_due:
            self._write_samples(step)
        if save_due:
            self.save(last_path)
        window.start += time.perf_counter() - paused
        # Every rank must stop at the same step: agree on the Ctrl-C flag, and on
        # a loss gone non-finite one step ago (a saved or final step is checked
        # exactly in save()).
        if self._stop_if_diverged(exact=False, interrupt=stop()):
            return "interrupt"
        if eval_due and self._patience_exhausted():
            return "early_stopping"
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            return "stop_after_steps"
        return None

    def _write_samples(self, step: int) -> None:
        """samples.jsonl at `step`, written by rank 0 (all ranks call)."""
        cfg = self.cfg
        model = self.unsharded_model()
        if self.ctx.is_main:
            # The decoding engine reads the weights, not the layers' hooks.
            with merged_view(model):
                write_training_samples(model, self.encoder, cfg.sample_prompts,
                                       step=step, seed=cfg.seed,
                                       max_decoding_length=cfg.max_decoding_length,
                                       output_dir=self.output_dir)
        if self.sharded:  # the copy is rank 0's alone: the others wait
            dist_utils.barrier(self.ctx)

    def unsharded_model(self):
        """The model as decoding needs it: a sharded one gathered into a whole
        copy on rank 0 (None on the other ranks; every rank calls), any other
        as it is."""
        if not self.sharded:
            return self.plain_model
        return sharding.gathered_model(self.plain_model, self.model_hparams, self.ctx,
                                       self.cfg.attention)

    def _patience_exhausted(self) -> bool:
        """early_stopping_patience evaluations in a row without a better dev
        perplexity (rank 0 knows; every rank gets its answer)."""
        patience = self.cfg.early_stopping_patience
        if patience <= 0:
            return False
        flag = torch.tensor([float(self.evals_since_best >= patience)], device=self.device)
        return bool(dist_utils.all_reduce_sum(flag, self.ctx)[0] > 0)

    def _display(self, window: "LossWindow", bar) -> None:
        nll = dist_utils.all_reduce_sum(window.nll.reshape(1).double(), self.ctx)
        loss = float(nll[0]) / window.tokens
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        record = dict(split="train", step=self.step, epoch=round(self._epochs_done(), 4),
                      loss=loss, ppl=perplexity(loss), lr=lr,
                      tokens_per_s=window.timed_tokens / elapsed)
        self.log.write(**record)
        if self.ctx.is_main:
            line = (f"step {self.step}/{self.end_step} | epoch {record['epoch']:.2f} | "
                    f"loss {loss:.4f} | ppl {record['ppl']:.2f} | lr {lr:.2e} | "
                    f"{record['tokens_per_s']:,.0f} tok/s | "
                    f"{self.clock.describe(self.step, self.end_step)}")
            if self.progress:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.write(line)
            else:
                print(line, flush=True)
        window.reset()

    def _epochs_done(self) -> float:
        """Epochs trained, as the log and the resume line both count them."""
        return self.step / self.steps_per_epoch

    def evaluate_and_track(self, should_stop=None) -> Optional[EvalResult]:
        """Dev perplexity on rank 0 (others wait); keeps model_best.ckpt."""
        result = None
        # A sharded model runs only with every rank: each evaluates the dev split.
        if self.ctx.is_main or self.sharded:
            result = evaluate(self.plain_model, self.dev_split, self.cfg.eval_batch_size,
                              self.device, self.cfg.precision, self.progress, should_stop)
        # A dev loss that is not finite is a diverged model: nothing of it is
        # logged or kept (all ranks stop together).
        self._stop_if_diverged(exact=True, problem=(
            f"the dev loss at step {self.step} is {result.loss} (not finite)"
            if result is not None and not math.isfinite(result.loss) else None))
        if result is not None:
            self.last_eval = result
            self.log.write(split="dev", step=self.step, loss=result.loss,
                           ppl=result.perplexity, examples=result.examples,
                           tokens=result.tokens)
            # A perplexity that is not finite (a diverged model) is never the best.
            improved = math.isfinite(result.perplexity) and (
                self.best_dev_ppl is None or result.perplexity < self.best_dev_ppl)
            mark = " (best so far)" if improved else ""
            self.ctx.print(f"step {self.step}/{self.end_step} | {result.describe()}{mark}"
                           f" | {self.clock.describe(self.step, self.end_step)}")
            self.evals_since_best = 0 if improved else self.evals_since_best + 1
            if improved:
                self.best_dev_ppl = result.perplexity
                self._write(os.path.join(self.output_dir, BEST_CHECKPOINT), lambda: {
                    "format": CHECKPOINT_FORMAT, **self._weights(), **self.model_fields,
                    "step": self.step, "dev_perplexity": result.perplexity})
        if result is not None or not self.ctx.is_main:
            self.last_eval_step = self.step  # an interrupted one is still owed
        dist_utils.barrier(self.ctx)
        return result

    def evaluate_at_final_step(self) -> Optional[EvalResult]:
        """The dev result at the current step, for --do_eval after training: the
        evaluation done at this step if there was one, else a new one (which
        may update model_best.ckpt). All ranks call it; rank 0 gets the result,
        the others None."""
        if self.last_eval_step != self.step:
            self.evaluate_and_track()
        return self.last_eval if self.ctx.is_main else None

    def outputs(self) -> List[Tuple[str, str]]:
        """(file name, what it holds) for each file of this run in output_dir."""
        last = os.path.join(self.output_dir, LAST_CHECKPOINT)
        kept = [(LAST_CHECKPOINT, f"last training state (continue with --do_train "
                                  f"--checkpoint {last})")]
        # A best perplexity carried over from a checkpoint of another directory
        # has no model_best.ckpt here until this run beats it.
        if self.best_dev_ppl is not None and os.path.isfile(
                os.path.join(self.output_dir, BEST_CHECKPOINT)):
            kept.append((BEST_CHECKPOINT, f"best dev perplexity {self.best_dev_ppl:.6g}"))
        kept.append((METRICS_LOG, "training and dev metrics, one JSON per line"))
        return kept

    def _final_eval_owed(self) -> bool:
        """Whether the model at the current step has no finished evaluation."""
        return self.dev_split is not None and self.last_eval_step != self.step

    def _eval_owed(self) -> bool:
        """Whether the evaluation due at the current step never finished."""
        eval_steps = self.cfg.eval_steps
        return (self.dev_split is not None and eval_steps > 0 and self.step > 0
                and self.step % eval_steps == 0 and self.last_eval_step != self.step)


class _RunClock:
    """Wall-clock time since this run's first step, and the ETA it implies
    (evaluations and saves included: they recur at the same rate)."""

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def describe(self, step: int, end_step: int) -> str:
        elapsed = self.elapsed()
        done = step - self.first_step
        eta = elapsed / done * (end_step - step) if done > 0 else None
        return (f"elapsed {_clock_time(elapsed)} | ETA "
                f"{_clock_time(eta) if eta is not None else '?'}")


def _clock_time(seconds: float) -> str:
    """H:MM:SS (days written out past 24 hours)."""
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{seconds:02d}"


class LossWindow:
    """Loss and token counts since the last display (kept on the device: no sync)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.nll = torch.zeros((), device=self.device)
        self.tokens = 0.0         # target tokens the loss covers (global)
        self.timed_tokens = 0.0   # of those, the ones trained since `start`
        self.start = time.perf_counter()

    def add(self, nll: torch.Tensor, tokens: float):
        self.nll += nll
        self.tokens += tokens
        self.timed_tokens += tokens


def _step_groups(indices, batch_size: int, accumulation: int):
    """Lists of up to `accumulation` micro-batches of up to `batch_size` indices."""
    while True:
        group = []
        for _ in range(accumulation):
            batch = list(islice(indices, batch_size))
            if not batch:
                break
            group.append(batch)
        if not group:
            return
        yield group
