"""The fine-tuning loop of gpt2_train_main.py: loss, schedule, evaluation, checkpoints.

The language-model loss of an example of `length` tokens is the cross-entropy
of text_ids[1:length] given text_ids[:length-1] (teacher forcing); padding is
never a target. Each optimizer step's loss is

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

A loss that is not finite (or weights that are not) stops training with
TrainingDiverged before anything of it is logged or saved: checkpoints on disk
keep their last finite versions. The check reads each step's marker one step
late (no sync per step) and exactly before every display, evaluation and save.
"""
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from utils import distributed as dist_utils
from utils.atomic import atomic_write
from utils.weights import checkpoint_model_fields, save_checkpoint
from utils.flags import load_config_module, misspelt_settings, settings_of
from utils.data import PreparedSplit
from utils.errors import UserError
from utils.processor import EOS_ID

CHECKPOINT_FORMAT = "gpt2-texar-train-1"
LAST_CHECKPOINT = "model.ckpt"
BEST_CHECKPOINT = "model_best.ckpt"
METRICS_LOG = "metrics.jsonl"
IGNORE_INDEX = -100
PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("constant", "linear", "cosine")
MAX_SEED = 2 ** 32 - 1  # numpy.random.seed takes no larger


# ---------------------------------------------------------------------------
# Configuration

@dataclass
class TrainConfig:
    """The settings of a `--config_train` module (see configs/config_train.py)."""
    data_dir: str
    max_seq_length: int
    train_batch_size: int
    eval_batch_size: int
    test_batch_size: int
    max_train_epoch: int
    display_steps: int
    eval_steps: int
    opt: Dict[str, Any]
    max_decoding_length: Optional[int] = None
    checkpoint_steps: int = -1
    warmup_steps: int = 0
    lr_decay: str = "constant"
    min_lr_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    precision: str = "fp32"
    seed: int = 0
    name: str = field(default="", compare=False)


_REQUIRED = ("data_dir", "max_seq_length", "train_batch_size", "eval_batch_size",
             "test_batch_size", "max_train_epoch", "display_steps", "eval_steps", "opt")
_OPTIONAL = ("max_decoding_length", "checkpoint_steps", "warmup_steps", "lr_decay",
             "min_lr_ratio", "gradient_accumulation_steps", "precision", "seed")
# Names the original examples used for the data directory.
_DATA_DIR_ALIASES = ("tfrecord_data_dir", "pickle_data_dir")


def load_train_config(name: str) -> TrainConfig:
    """Read and check a training config given as a module name or a .py path."""
    module = load_config_module(name)
    _check_spelling(module, name)
    values = {}
    if not hasattr(module, "data_dir"):
        for alias in _DATA_DIR_ALIASES:
            if hasattr(module, alias):
                values["data_dir"] = getattr(module, alias)
                break
    missing = [k for k in _REQUIRED if k not in values and not hasattr(module, k)]
    if missing:
        raise UserError(f"training config {name} lacks {', '.join(missing)}: "
                        f"start from configs/config_train.py")
    for key in _REQUIRED + _OPTIONAL:
        if hasattr(module, key):
            values[key] = getattr(module, key)
    cfg = TrainConfig(name=name, **values)
    if cfg.max_decoding_length is None:
        cfg.max_decoding_length = cfg.max_seq_length
    check_train_config(cfg)
    return cfg


def _check_spelling(module, name: str) -> None:
    """A setting whose name nearly matches a field (checkpoint_step) would be
    ignored without a word: it is an error naming the right spelling."""
    known = _REQUIRED + _OPTIONAL + _DATA_DIR_ALIASES
    typos = misspelt_settings(settings_of(module), known)
    if typos:
        listed = ", ".join(f"{wrong} (did you mean {right}?)" for wrong, right in typos)
        raise UserError(f"training config {name} sets {listed}, which is not a "
                        f"setting: fix the name (the settings are listed in "
                        f"configs/config_train.py)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_train_config(cfg: TrainConfig) -> None:
    """One UserError naming the field and the fix for the first bad value."""
    def bad(field_name, why):
        raise UserError(f"{field_name} = {getattr(cfg, field_name)!r} in training "
                        f"config {cfg.name}: {why}")

    if not isinstance(cfg.data_dir, str) or not cfg.data_dir:
        bad("data_dir", "give the directory prepare_data.py wrote to")
    for key in ("train_batch_size", "eval_batch_size", "test_batch_size",
                "max_train_epoch", "gradient_accumulation_steps"):
        if not _is_int(getattr(cfg, key)) or getattr(cfg, key) < 1:
            bad(key, "must be a positive integer")
    for key in ("display_steps", "eval_steps", "checkpoint_steps", "seed"):
        if not _is_int(getattr(cfg, key)):
            bad(key, "must be an integer (-1 disables the step-based ones)")
    if not 0 <= cfg.seed <= MAX_SEED:
        bad("seed", f"must be between 0 and {MAX_SEED}")
    if not _is_int(cfg.max_seq_length) or cfg.max_seq_length < 3:
        bad("max_seq_length", "must be an integer of at least 3 (it counts the "
                              "two <|endoftext|> tokens)")
    if not _is_int(cfg.max_decoding_length) or cfg.max_decoding_length < 2:
        bad("max_decoding_length", "must be an integer of at least 2")
    if not _is_int(cfg.warmup_steps) or cfg.warmup_steps < 0:
        bad("warmup_steps", "must be an integer >= 0")
    if cfg.lr_decay not in LR_DECAYS:
        bad("lr_decay", f"must be one of {', '.join(LR_DECAYS)}")
    if not isinstance(cfg.min_lr_ratio, (int, float)) or not 0 <= cfg.min_lr_ratio <= 1:
        bad("min_lr_ratio", "must be a number between 0 and 1")
    if cfg.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    _check_opt(cfg)


def _opt_hparams(opt: Dict[str, Any]):
    """texar's HParams for `opt`, with its defaults filled in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import texar.torch as tx
    return tx.HParams(opt, tx.core.default_optimization_hparams())


def _check_opt(cfg: TrainConfig) -> None:
    where = f"opt in training config {cfg.name}"
    if not isinstance(cfg.opt, dict):
        raise UserError(f"{where} must be a dict like "
                        f"{{'optimizer': {{'type': 'AdamW', 'kwargs': {{'lr': 1e-4}}}}}}")
    try:
        hparams = _opt_hparams(cfg.opt)
    except ValueError as err:
        raise UserError(f"{where} is not valid texar optimization hparams: {err}") from None
    if hparams.learning_rate_decay.type:
        raise UserError(f"{where} sets learning_rate_decay, which this trainer does "
                        f"not use: set warmup_steps, lr_decay and min_lr_ratio instead")
    if hparams.gradient_noise_scale is not None:
        raise UserError(f"{where} sets gradient_noise_scale, which is not supported: "
                        f"remove it")
    kwargs = hparams.optimizer.kwargs.todict()
    lr = kwargs.get("lr")
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"{where}: optimizer kwargs need a finite positive 'lr' "
                        f"(got {lr!r}), e.g. 1e-4")
    _check_numbers(kwargs, f"{where}: optimizer kwargs")
    if hparams.gradient_clip.type:
        _check_numbers(hparams.gradient_clip.kwargs.todict(), f"{where}: gradient_clip kwargs")
    # Build the optimizer and the clipping function once on a throw-away
    # parameter, so a bad type or kwarg fails now, before the model loads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import texar.torch as tx
    probe = torch.nn.Parameter(torch.zeros(1))
    probe.grad = torch.zeros(1)
    try:
        tx.core.get_optimizer([probe], hparams)
        clip = tx.core.get_grad_clip_fn(hparams)
        if clip is not None:
            clip(parameters=[probe])
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise UserError(f"{where} cannot be used: {' '.join(str(err).split())}: fix "
                        f"the optimizer type, its kwargs or gradient_clip") from None


# A NaN or infinite optimizer or clipping number makes every update NaN; a zero
# or negative rate or clipping threshold makes it nothing or backwards.
# (norm_type may be inf: the max norm.)
_POSITIVE_KWARGS = ("lr", "max_norm", "clip_value")
_MAY_BE_INFINITE = ("norm_type",)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(kwargs: Dict[str, Any], where: str) -> None:
    """Every number in `kwargs` (tuples included) finite, thresholds positive."""
    for key, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for number in values:
            if not _is_number(number):
                continue
            if math.isnan(number) or (math.isinf(number) and key not in _MAY_BE_INFINITE):
                raise UserError(f"{where}: {key} = {value!r} is not a finite number: "
                                f"give a finite value")
            if key in _POSITIVE_KWARGS and number <= 0:
                raise UserError(f"{where}: {key} = {value!r} must be positive")


# ---------------------------------------------------------------------------
# Loss, evaluation, schedule

def target_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] True where position t predicts a real token (t < length - 1)."""
    positions = torch.arange(width, device=lengths.device)
    return positions[None, :] < (lengths[:, None] - 1)


def lm_nll(model, ids: torch.Tensor, lengths: torch.Tensor, per_token: bool = False):
    """Summed next-token NLL of a padded batch, and the number of targets.

    ids [B, T] (T = the longest example), lengths [B]. Targets are
    ids[b, 1:lengths[b]]. With per_token=True the sum is taken in float64
    (for evaluation); otherwise it is a differentiable float32 scalar.
    """
    inputs, targets = ids[:, :-1], ids[:, 1:]
    mask = target_mask(lengths, targets.size(1))
    targets = targets.masked_fill(~mask, IGNORE_INDEX)
    logits = model(inputs=inputs, decoding_strategy="train_greedy").logits
    flat_logits = logits.reshape(-1, logits.size(-1))
    if per_token:
        nll = F.cross_entropy(flat_logits.float(), targets.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none")
        return nll.double().sum(), mask.sum()
    nll = F.cross_entropy(flat_logits, targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
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

    Batches group examples of similar length, so little is spent on padding.
    Returns None when `should_stop()` turns true before the end.
    """
    from tqdm import tqdm
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
                with autocast(precision, device):
                    nll, count = lm_nll(model, ids, lengths, per_token=True)
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


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision = 'fp16' needs a CUDA GPU: use 'bf16' or 'fp32' "
                        "in the training config on CPU")
    if (precision == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise UserError("this GPU has no bfloat16 support: use precision = 'fp16' "
                        "or 'fp32' in the training config")


# ---------------------------------------------------------------------------
# Random-number states (plain types only, so checkpoints load with weights_only)

def _local_rng_bytes(device: torch.device) -> torch.Tensor:
    parts = [torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts)


def gather_rng_states(ctx) -> Dict[str, Any]:
    """Every rank's torch (and CUDA) RNG state; call on all ranks together."""
    local = _local_rng_bytes(ctx.device).to(torch.int64)
    table = torch.zeros(ctx.world_size, local.numel(), dtype=torch.int64)
    table[ctx.rank] = local
    dist_utils.all_reduce_sum(table, ctx)
    np_state = np.random.get_state()
    return {
        "world_size": ctx.world_size,
        "cpu_bytes": int(torch.get_rng_state().numel()),
        "ranks": [row.to(torch.uint8) for row in table],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def restore_rng_states(state: Dict[str, Any], ctx) -> bool:
    """Restore this rank's RNG states; False when the saved layout differs."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if state["world_size"] != ctx.world_size:
        return False
    mine = state["ranks"][ctx.rank]
    cpu = state["cpu_bytes"]
    torch.set_rng_state(mine[:cpu].clone())
    if ctx.device.type == "cuda":
        if mine.numel() == cpu:
            return False
        torch.cuda.set_rng_state(mine[cpu:].clone(), ctx.device)
    return True


def _as_tuples(value):
    """random.setstate wants tuples where a round trip may give lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


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


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; nothing of it was saved."""


# ---------------------------------------------------------------------------
# Metrics log

class MetricsLog:
    """JSON lines in output_dir/metrics.jsonl, one per display and evaluation.

    A new run starts the file afresh; a resumed run keeps the records up to
    the step it resumes from (dropping any written after that checkpoint, e.g.
    before a crash), so the file always describes one consistent run.
    """

    def __init__(self, path: str, resume_step: Optional[int], enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: name the file
            if err.filename is None:
                raise OSError(err.errno, err.strerror, self.path) from err
            raise


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
                 stop_after_steps: Optional[int] = None, progress: bool = True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import texar.torch as tx
        self.cfg, self.ctx = cfg, ctx
        # Checkpoints store the model's sizes as plain numbers, never texar hparams.
        self.model_fields = checkpoint_model_fields(model_hparams)
        self.train_split, self.dev_split = train_split, dev_split
        self.output_dir = output_dir
        self.stop_after_steps = stop_after_steps
        self.progress = progress and ctx.is_main
        self.device = ctx.device
        check_precision(cfg.precision, self.device)

        self.plain_model = model
        model.train()
        self.model = dist_utils.wrap_model(model, ctx)
        hparams = _opt_hparams(cfg.opt)
        self.optimizer = _make_optimizer(tx, _param_groups(model), hparams, self.device)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.clip_grad = tx.core.get_grad_clip_fn(hparams)
        self.scaler = _grad_scaler() if cfg.precision == "fp16" else None

        self.sampler = dist_utils.make_train_sampler(len(train_split), ctx, cfg.seed)
        self.global_batch = dist_utils.global_batch_size(
            cfg.train_batch_size, ctx, cfg.gradient_accumulation_steps)
        examples_per_rank = math.ceil(len(train_split) / ctx.world_size)
        self.steps_per_epoch = math.ceil(
            examples_per_rank / (cfg.train_batch_size * cfg.gradient_accumulation_steps))
        self.total_steps = self.steps_per_epoch * cfg.max_train_epoch

        self.step = 0             # optimizer steps done
        self.epoch = 0            # the epoch in progress
        self.examples_done = 0    # of this epoch's global order
        self.best_dev_ppl: Optional[float] = None
        self.last_eval: Optional[EvalResult] = None
        self.last_eval_step: Optional[int] = None
        self.window = _Window(self.device)  # training loss since the last display
        self.last_saved_step: Optional[int] = None  # model.ckpt written by this run
        # The first step whose loss was not finite (-1: none yet) and that loss,
        # kept on the device so that watching for it costs no sync per step;
        # `_bad_step_before` is the marker as it was one step earlier.
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)
        self._bad_step_before = self._bad_step
        if resume is not None:
            self._load_state(resume)
        else:
            # Dropout differs per rank; data order comes from the sampler.
            torch.manual_seed(cfg.seed + ctx.rank)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
        self.log = MetricsLog(os.path.join(output_dir, METRICS_LOG),
                              self.step if resume is not None else None,
                              enabled=ctx.is_main)

    # -- state -----------------------------------------------------------

    def state_dict(self, rng: Dict[str, Any], window_nll: float = 0.0) -> Dict[str, Any]:
        """Everything to continue exactly; `window_nll` is the display window's
        loss summed over all ranks."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.plain_model.state_dict(),
            **self.model_fields,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_type": type(self.optimizer).__name__,
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "schedule": {"base_lrs": self.base_lrs, "warmup_steps": self.cfg.warmup_steps,
                         "total_steps": self.total_steps, "lr_decay": self.cfg.lr_decay,
                         "min_lr_ratio": self.cfg.min_lr_ratio},
            "step": self.step,
            "epoch": self.epoch,
            "examples_done_in_epoch": self.examples_done,
            "rng": rng,
            "best_dev_ppl": self.best_dev_ppl,
            "last_eval_step": self.last_eval_step,
            "last_eval": dataclasses.asdict(self.last_eval) if self.last_eval else None,
            "display_window": {"nll": window_nll, "tokens": self.window.tokens},
            "data": {"train_examples": len(self.train_split),
                     "train_batch_size": self.cfg.train_batch_size,
                     "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                     "world_size": self.ctx.world_size, "seed": self.cfg.seed},
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError("the --checkpoint was not written by this version of "
                            "gpt2_train_main.py, so training cannot resume from it")
        saved_type, mine = state.get("optimizer_type"), type(self.optimizer).__name__
        if saved_type is not None and saved_type != mine:
            raise UserError(f"the --checkpoint was trained with {saved_type} but "
                            f"{self.cfg.name} configures {mine}: resume with the same "
                            f"optimizer type, or leave out --checkpoint to start anew")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise UserError(f"the optimizer state in the --checkpoint does not fit "
                            f"the optimizer of {self.cfg.name} ({type(err).__name__}: "
                            f"{err}): resume with the same opt settings, or leave out "
                            f"--checkpoint to start anew") from None
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.examples_done = int(state["examples_done_in_epoch"])
        self.best_dev_ppl = state.get("best_dev_ppl")
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
        now = {"train_examples": len(self.train_split),
               "train_batch_size": self.cfg.train_batch_size,
               "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
               "world_size": self.ctx.world_size, "seed": self.cfg.seed}
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
            self._print(f"note: {note}", file=sys.stderr)

    def save(self, path: str) -> None:
        """Write a full training checkpoint (rank 0 writes; all ranks call).

        Never a diverged one: TrainingDiverged instead, and `path` keeps the
        last good checkpoint."""
        self._stop_if_diverged(exact=True, check_weights=True)
        rng = gather_rng_states(self.ctx)
        nll = dist_utils.all_reduce_sum(
            self.window.nll.detach().reshape(1).double().cpu(), self.ctx)
        if self.ctx.is_main:
            save_checkpoint(path, self.state_dict(rng, float(nll[0])))
        dist_utils.barrier(self.ctx)
        self.last_saved_step = self.step

    # -- loop ------------------------------------------------------------

    def train(self) -> None:
        """Train until max_train_epoch (or --stop_after_steps, or Ctrl-C)."""
        from tqdm import tqdm
        cfg = self.cfg
        last_path = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if self.step >= self.total_steps or self.epoch >= cfg.max_train_epoch:
            self._print(f"Training already complete: step {self.step} of "
                        f"{self.total_steps} (raise max_train_epoch to train more).")
            return
        if self.stop_after_steps is not None and self.step >= self.stop_after_steps:
            self._print(f"Already at step {self.step}, not before --stop_after_steps "
                        f"{self.stop_after_steps}: nothing to train.")
            return
        self._print(dist_utils.describe(self.ctx, cfg.train_batch_size,
                                        cfg.gradient_accumulation_steps))
        self._print(f"{len(self.train_split):,} training examples, "
                    f"{self.steps_per_epoch} steps per epoch, {self.total_steps} steps "
                    f"in {cfg.max_train_epoch} epochs"
                    + (f"; resuming at step {self.step} (epoch {self.epoch + 1})"
                       if self.step else "") + ".")
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                   desc="train", dynamic_ncols=True,
                   disable=None if self.progress else True)
        window = self.window
        window.start, window.timed_tokens = time.perf_counter(), 0.0
        stopped_by = None
        with StopRequest() as stop, dist_utils.peer_failure_guard(self.ctx):
            if self._eval_owed():  # due at the checkpoint's step, cut short by Ctrl-C
                self.evaluate_and_track(should_stop=stop)
            for epoch in range(self.epoch, cfg.max_train_epoch):
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
                    if stopped_by:
                        break
                if stopped_by:
                    break
            else:
                self.epoch, self.examples_done = cfg.max_train_epoch, 0
            bar.close()
            self.save(last_path)
        if stopped_by == "interrupt":
            self._print(f"Interrupted at step {self.step}: saved {last_path}. Continue "
                        f"with --do_train --checkpoint {last_path}.", file=sys.stderr)
            raise TrainingInterrupted
        if stopped_by == "stop_after_steps":
            self._print(f"Stopped at step {self.step} (--stop_after_steps); saved "
                        f"{last_path}. Continue with --do_train --checkpoint {last_path}.")
        else:
            self._print(f"Training done: {self.step} steps; saved {last_path}.")

    def _train_step(self, group: List[List[int]], window: "_Window") -> None:
        """One optimizer step over `group` (micro-batches of example indices)."""
        ctx, cfg = self.ctx, self.cfg
        batches = [self._batch(ix) for ix in group]
        local_tokens = sum(int((lengths - 1).sum()) for _, lengths in batches)
        tokens = dist_utils.all_reduce_sum(
            torch.tensor([local_tokens], dtype=torch.float64), ctx)
        scale = ctx.world_size / float(tokens[0])

        multiplier = lr_multiplier(self.step, warmup_steps=cfg.warmup_steps,
                                   total_steps=self.total_steps, decay=cfg.lr_decay,
                                   min_ratio=cfg.min_lr_ratio)
        for group_, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group_["lr"] = base_lr * multiplier

        step_nll = torch.zeros((), device=self.device)
        for i, (ids, lengths) in enumerate(batches):
            ids = ids.to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
            with dist_utils.maybe_no_sync(self.model, sync=i == len(batches) - 1):
                with autocast(cfg.precision, self.device):
                    nll, _ = lm_nll(self.model, ids, lengths)
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
        self._note_loss(step_nll / float(tokens[0]))

    # -- divergence ------------------------------------------------------

    def _note_loss(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is not finite (device ops only)."""
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step_before = self._bad_step
        self._bad_step = self._bad_step.masked_fill(first, self.step + 1)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)

    def _weights_finite(self) -> bool:
        flags = [torch.isfinite(p).all() for p in self.plain_model.parameters()]
        return bool(torch.stack(flags).all())

    def _stop_if_diverged(self, exact: bool, check_weights: bool = False,
                          interrupt: bool = False) -> bool:
        """Raise TrainingDiverged when any rank saw a non-finite loss (up to
        this step if `exact`, else up to the previous one, which needs no wait
        for the step just queued) or, with `check_weights`, holds a non-finite
        weight. Also agrees on the Ctrl-C flag `interrupt` in the same
        collective: True when any rank was interrupted. All ranks call it."""
        marker = self._bad_step if exact else self._bad_step_before
        weights_bad = check_weights and not self._weights_finite()
        flags = torch.tensor([float(int(marker) >= 0), float(weights_bad),
                              float(interrupt)], dtype=torch.float64)
        flags = dist_utils.all_reduce_sum(flags, self.ctx)
        if flags[0] > 0 or flags[1] > 0:
            self._raise_diverged()
        return bool(flags[2] > 0)

    def _raise_diverged(self) -> None:
        """One line: the step, the loss, what was kept and the likely cause."""
        ctx = self.ctx
        table = torch.zeros(ctx.world_size, 2, dtype=torch.float64)
        table[ctx.rank, 0] = float(self._bad_step)
        table[ctx.rank, 1] = float(self._bad_loss)
        # Each rank fills its own row; the sum gives every rank the whole table.
        seen = [(int(s), l) for s, l in dist_utils.all_reduce_sum(table, ctx).tolist()
                if s >= 0]
        if seen:
            step, loss = min(seen)
            what = f"the loss at step {step} is {loss} (not finite)"
        else:
            what = f"the weights are no longer finite after step {self.step}"
        last_path = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if self.last_saved_step is not None:
            kept = (f"nothing after step {self.last_saved_step} was saved ({last_path} "
                    f"holds step {self.last_saved_step})")
        elif os.path.exists(last_path):
            kept = f"nothing was saved: {last_path} is left as it was"
        else:
            kept = "nothing was saved"
        if self.cfg.precision == "fp16":
            cause = ("float16 overflow (precision 'fp16'): use precision 'bf16' or "
                     "'fp32' in the training config, or a lower lr")
        else:
            lr = max(self.base_lrs)
            cause = (f"a learning rate too high for this model (peak lr {lr:g} in "
                     f"{self.cfg.name}): lower it, lengthen warmup_steps or clip "
                     f"gradients (gradient_clip max_norm)")
        raise TrainingDiverged(f"training stopped: {what}; {kept}. Likely cause: {cause}")

    def _batch(self, indices: List[int]):
        """A padded batch; sampler padding slots become rows with no targets
        (length 1), so a rank still runs its step without counting an example
        twice."""
        real = [i for i in indices if i != dist_utils.PAD_INDEX]
        empty = len(indices) - len(real)
        if not empty:
            return self.train_split.batch(real, EOS_ID)
        if real:
            ids, lengths = self.train_split.batch(real, EOS_ID)
        else:  # width 2: the model needs at least one input position
            ids, lengths = (torch.empty(0, 2, dtype=torch.int64),
                            torch.empty(0, dtype=torch.int64))
        ids = torch.cat([ids, torch.full((empty, ids.size(1)), EOS_ID, dtype=ids.dtype)])
        lengths = torch.cat([lengths, torch.ones(empty, dtype=lengths.dtype)])
        return ids, lengths

    def _after_step(self, window: "_Window", bar, stop: StopRequest,
                    last_path: str) -> Optional[str]:
        """Display, evaluate, checkpoint; the reason to stop, if any."""
        cfg, step = self.cfg, self.step
        display_due = cfg.display_steps > 0 and step % cfg.display_steps == 0
        eval_due = (cfg.eval_steps > 0 and step % cfg.eval_steps == 0
                    and self.dev_split is not None)
        save_due = cfg.checkpoint_steps > 0 and step % cfg.checkpoint_steps == 0
        if display_due or eval_due:  # never log, evaluate or keep a diverged model
            self._stop_if_diverged(exact=True, check_weights=eval_due)
        if display_due:
            self._display(window, bar)
        paused = time.perf_counter()  # evaluation and saving do not count in tok/s
        if eval_due:
            self.evaluate_and_track(should_stop=stop)
        if save_due:
            self.save(last_path)
        window.start += time.perf_counter() - paused
        # Every rank must stop at the same step: agree on the Ctrl-C flag, and on
        # a loss gone non-finite one step ago (a saved or final step is checked
        # exactly in save()).
        if self._stop_if_diverged(exact=False, interrupt=stop()):
            return "interrupt"
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            return "stop_after_steps"
        return None

    def _display(self, window: "_Window", bar) -> None:
        nll = dist_utils.all_reduce_sum(window.nll.reshape(1).double(), self.ctx)
        loss = float(nll[0]) / window.tokens
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        record = dict(split="train", step=self.step,
                      epoch=round(self.step / self.steps_per_epoch, 4),
                      loss=loss, ppl=perplexity(loss), lr=lr,
                      tokens_per_s=window.timed_tokens / elapsed)
        self.log.write(**record)
        if self.ctx.is_main:
            line = (f"step {self.step:>6} | epoch {record['epoch']:.2f} | loss {loss:.4f} | "
                    f"ppl {record['ppl']:.2f} | lr {lr:.2e} | "
                    f"{record['tokens_per_s']:,.0f} tok/s")
            if self.progress:
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.write(line)
            else:
                print(line, flush=True)
        window.reset()

    def evaluate_and_track(self, should_stop=None) -> Optional[EvalResult]:
        """Dev perplexity on rank 0 (others wait); keeps model_best.ckpt."""
        result = None
        if self.ctx.is_main:
            result = evaluate(self.plain_model, self.dev_split, self.cfg.eval_batch_size,
                              self.device, self.cfg.precision, self.progress, should_stop)
            if result is not None:
                self.last_eval = result
                self.log.write(split="dev", step=self.step, loss=result.loss,
                               ppl=result.perplexity, examples=result.examples,
                               tokens=result.tokens)
                # A perplexity that is not finite (a diverged model) is never the best.
                improved = math.isfinite(result.perplexity) and (
                    self.best_dev_ppl is None or result.perplexity < self.best_dev_ppl)
                mark = " (best so far)" if improved else ""
                self._print(f"step {self.step:>6} | {result.describe()}{mark}")
                if improved:
                    self.best_dev_ppl = result.perplexity
                    save_checkpoint(os.path.join(self.output_dir, BEST_CHECKPOINT), {
                        "format": CHECKPOINT_FORMAT,
                        "model": self.plain_model.state_dict(),
                        **self.model_fields,
                        "step": self.step, "dev_perplexity": result.perplexity})
        if result is not None or not self.ctx.is_main:
            self.last_eval_step = self.step  # an interrupted one is still owed
        dist_utils.barrier(self.ctx)
        return result

    def _eval_owed(self) -> bool:
        """Whether the evaluation due at the current step never finished."""
        eval_steps = self.cfg.eval_steps
        return (self.dev_split is not None and eval_steps > 0 and self.step > 0
                and self.step % eval_steps == 0 and self.last_eval_step != self.step)

    def _print(self, *args, **kwargs) -> None:
        if self.ctx.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)


class _Window:
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
    from itertools import islice
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


def _param_groups(model) -> List[Dict[str, Any]]:
    """Weight decay on matrices only, not on biases and LayerNorm gains (as GPT-2
    fine-tuning usually does); the optimizer kwargs' weight_decay applies to the
    first group."""
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters appear once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(tx, groups, hparams, device):
    """texar's get_optimizer; Adam/AdamW use torch's fused kernel when the
    config leaves the implementation open and this torch has it for the
    device (one kernel over all parameters instead of several per tensor).
    The arithmetic is the same AdamW."""
    opt = hparams.optimizer
    kwargs = opt.kwargs.todict()
    if (opt.type in ("Adam", "AdamW", "torch.optim.Adam", "torch.optim.AdamW")
            and not {"fused", "foreach"} & set(kwargs)):
        fused = hparams.todict()
        fused["optimizer"]["kwargs"]["fused"] = True
        try:
            probe = torch.zeros(1, device=device, requires_grad=True)
            getattr(torch.optim, opt.type.split(".")[-1])([probe], lr=1.0, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch or an unsupported device: torch's default
        else:
            return tx.core.get_optimizer(groups, fused)
    return tx.core.get_optimizer(groups, hparams)


def _grad_scaler():
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()
