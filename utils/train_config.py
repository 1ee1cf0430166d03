"""The training config (`--config_train`): its fields, and every check of them.

A config is a plain Python module (see configs/config_train.py). It is read
into a `TrainConfig` and checked before anything heavy loads: missing or
misspelt settings, values out of range, an optimizer (texar optimization
hparams) that could not be built or would make every update non-finite, and a
precision the device cannot run.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from utils.flags import MAX_SEED, load_config_module, misspelt_settings, settings_of
from utils.errors import UserError
from utils.fused_attention import ATTENTIONS
from utils.memory_options import TRAINABLE
from utils.metrics_log import check_tensorboard_installed
from utils.model import import_texar
from utils.optimizer import opt_hparams

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("constant", "linear", "cosine")


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
    gradient_checkpointing: bool = False
    trainable: str = "all"
    tensorboard_dir: Optional[str] = None
    sample_steps: int = -1
    sample_prompts: Tuple[str, ...] = ("",)
    early_stopping_patience: int = -1
    attention: str = "fused"
    compile: bool = False
    name: str = field(default="", compare=False)


_REQUIRED = ("data_dir", "max_seq_length", "train_batch_size", "eval_batch_size",
             "test_batch_size", "max_train_epoch", "display_steps", "eval_steps", "opt")
_OPTIONAL = ("max_decoding_length", "checkpoint_steps", "warmup_steps", "lr_decay",
             "min_lr_ratio", "gradient_accumulation_steps", "precision", "seed",
             "gradient_checkpointing", "trainable", "tensorboard_dir",
             "sample_steps", "sample_prompts", "early_stopping_patience",
             "attention", "compile")
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
    for key in ("display_steps", "eval_steps", "checkpoint_steps", "seed",
                "sample_steps", "early_stopping_patience"):
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
    if (not isinstance(cfg.sample_prompts, (list, tuple)) or not cfg.sample_prompts
            or not all(isinstance(p, str) for p in cfg.sample_prompts)):
        bad("sample_prompts", "must be a list of texts, e.g. ['', 'Once upon a time']")
    if cfg.early_stopping_patience > 0 and cfg.eval_steps <= 0:
        bad("early_stopping_patience", "counts dev evaluations: set eval_steps "
                                       "too, or -1 to disable it")
    if cfg.precision not in PRECISIONS:
        bad("precision", f"must be one of {', '.join(PRECISIONS)}")
    if not isinstance(cfg.gradient_checkpointing, bool):
        bad("gradient_checkpointing", "must be True or False")
    if cfg.attention not in ATTENTIONS:
        bad("attention", "must be 'fused' (PyTorch's scaled_dot_product_attention "
                         "and one-kernel GELU) or 'texar' (texar's original forward)")
    if not isinstance(cfg.compile, bool):
        bad("compile", "must be True or False")
    if cfg.trainable not in TRAINABLE:
        bad("trainable", f"must be one of {', '.join(map(repr, TRAINABLE))} "
                         f"('transformer' freezes the embeddings)")
    if cfg.tensorboard_dir is not None:
        if not isinstance(cfg.tensorboard_dir, str) or not cfg.tensorboard_dir:
            bad("tensorboard_dir", "must be a directory path, or None for no TensorBoard log")
        check_tensorboard_installed(f"tensorboard_dir in training config {cfg.name}")
    _check_opt(cfg)


def _check_opt(cfg: TrainConfig) -> None:
    where = f"opt in training config {cfg.name}"
    if not isinstance(cfg.opt, dict):
        raise UserError(f"{where} must be a dict like "
                        f"{{'optimizer': {{'type': 'AdamW', 'kwargs': {{'lr': 1e-4}}}}}}")
    try:
        hparams = opt_hparams(cfg.opt)
    except ValueError as err:
        raise UserError(f"{where} is not valid texar optimization hparams: {err}") from None
    if hparams.learning_rate_decay.type:
        raise UserError(f"{where} sets learning_rate_decay, which this trainer does "
                        f"not use: set warmup_steps, lr_decay and min_lr_ratio instead")
    if hparams.gradient_noise_scale is not None:
        raise UserError(f"{where} sets gradient_noise_scale, which is not supported: "
                        f"remove it")
    if (hparams.optimizer.type in ("Adafactor", "torch.optim.Adafactor")
            and not hasattr(torch.optim, "Adafactor")):
        raise UserError(f"{where}: Adafactor needs torch >= 2.5 (this is "
                        f"{torch.__version__}): upgrade torch, or use SGD with momentum")
    kwargs = hparams.optimizer.kwargs.todict()
    lr = kwargs.get("lr")
    if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"{where}: optimizer kwargs need a finite positive 'lr' "
                        f"(got {lr!r}), e.g. 1e-4")
    _check_numbers(kwargs, f"{where}: optimizer kwargs")
    if hparams.gradient_clip.type:
        _check_numbers(hparams.gradient_clip.kwargs.todict(), f"{where}: gradient_clip kwargs")
    _try_building(hparams, where)


def _try_building(hparams, where: str) -> None:
    """Build the optimizer and the clipping function once on a throw-away
    parameter, so a bad type or kwarg fails now, before the model loads."""
    tx = import_texar()
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


def check_precision(precision: str, device: torch.device) -> None:
    """The config's precision must run on `device` (known only once it is chosen)."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision = 'fp16' needs a CUDA GPU: use 'bf16' or 'fp32' "
                        "in the training config on CPU")
    if (precision == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise UserError("this GPU has no bfloat16 support: use precision = 'fp16' "
                        "or 'fp32' in the training config")
