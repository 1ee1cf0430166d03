"""The training config (`--config_train`): its fields, and every check of them.

A config is a plain Python module (see configs/config_train.py). It is read
into a `TrainConfig`, the command line's settings laid over it (flags such as
--max_train_epoch, and --set key=value for any field), max_seq_length read
from the prepared data when neither sets it, and checked before anything
heavy loads; `cfg.sources` says where each value came from. Checked: missing
settings, values that are no setting (utils/config_modules.py), values out of
range, an optimizer (texar optimization
hparams) that could not be built or would make every update non-finite, and a
precision the device cannot run.
"""
import ast
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from utils.config_modules import (check_config_names, closest_field, load_config_module,
                                   settings_of)
from utils.data.data_info import read_data_info
from utils.data.records import SPLITS, PreparedSplit, split_data_path
from utils.decoding.limits import MAX_SEED
from utils.errors import UserError
from utils.lora import LoraSettings, lora_settings
from utils.training.memory_options import TRAINABLE
from utils.training.metrics_log import check_tensorboard_installed
from utils.fused_attention import ATTENTIONS
from utils.model import import_texar
from utils.training.optimizer import opt_hparams

PRECISIONS = ("fp32", "bf16", "fp16")
LR_DECAYS = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """The settings of a `--config_train` module (see configs/config_train.py)."""
    data_dir: str
    max_seq_length: Optional[int]  # None: the length the data was prepared with
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
    lora: Optional[Dict[str, Any]] = None
    shard_model: bool = False
    max_steps: int = -1  # > 0: train this many steps, whatever max_train_epoch says
    attention: str = "fused"
    compile: bool = False
    name: str = field(default="", compare=False)
    # Where each setting came from: FROM_FLAG, FROM_CONFIG, "data (<file>)" or
    # FROM_DEFAULT (see describe_settings).
    sources: Dict[str, str] = field(default_factory=dict, compare=False)

    def asks_for_less_memory(self) -> bool:
        """Whether a memory option is on (gradient checkpointing, frozen
        embeddings, LoRA, sharding): such a run trades speed for memory."""
        return (self.gradient_checkpointing or self.trainable != "all"
                or self.lora is not None or self.shard_model)


FROM_FLAG = "flag"
FROM_CONFIG = "config file"
FROM_DEFAULT = "default"
# The settings a command line may give (--set key=value, or their own flags).
SETTABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.compare)
# Not a field: the optimizer's peak learning rate inside `opt` (--lr).
LR_SETTING = "lr"


_REQUIRED = ("data_dir", "train_batch_size", "eval_batch_size",
             "test_batch_size", "max_train_epoch", "display_steps", "eval_steps", "opt")
_OPTIONAL = ("max_seq_length", "max_decoding_length", "max_steps", "checkpoint_steps",
             "warmup_steps", "lr_decay",
             "min_lr_ratio", "gradient_accumulation_steps", "precision", "seed",
             "gradient_checkpointing", "trainable", "tensorboard_dir",
             "sample_steps", "sample_prompts", "early_stopping_patience", "lora",
             "shard_model", "attention", "compile")
# Names the original examples used for the data directory.
_DATA_DIR_ALIASES = ("tfrecord_data_dir", "pickle_data_dir")
# The original example's texar data pipeline: accepted, so that its config
# runs as it is, but not read (batches come from the *_batch_size settings).
_ORIGINAL_PIPELINE = ("feature_types", "train_hparam", "eval_hparam", "test_hparam")
# Settings counted in steps (or evaluations): positive, or -1 for off.
STEP_SETTINGS = ("display_steps", "eval_steps", "checkpoint_steps", "sample_steps",
                 "max_steps")


def load_train_config(name: str, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Read and check a training config given as a module name or a .py path,
    with `overrides` (setting -> value, from the command line: a field of
    TrainConfig, or LR_SETTING) laid over it."""
    module = load_config_module(name)
    check_config_names(module, _REQUIRED + _OPTIONAL + _DATA_DIR_ALIASES
                       + _ORIGINAL_PIPELINE, f"training config {name}",
                       "configs/config_train.py")
    _note_original_pipeline(module, name)
    values = {}
    if not hasattr(module, "data_dir"):
        for alias in _DATA_DIR_ALIASES:
            if hasattr(module, alias):
                values["data_dir"] = getattr(module, alias)
                break
    for key in _REQUIRED + _OPTIONAL:
        if hasattr(module, key):
            values[key] = getattr(module, key)
    sources = {key: FROM_CONFIG for key in values}
    for key, value in (overrides or {}).items():
        if key == LR_SETTING:
            values["opt"] = _with_lr(values.get("opt"), value, name)
        else:
            values[key] = value
        sources[key] = FROM_FLAG
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise UserError(f"training config {name} lacks {', '.join(missing)}: "
                        f"start from configs/config_train.py, or give them with "
                        f"--set key=value")
    values.setdefault("max_seq_length", None)
    cfg = TrainConfig(name=name, sources=sources, **values)
    for key in SETTABLE:
        cfg.sources.setdefault(key, FROM_DEFAULT)
    if isinstance(cfg.data_dir, str) and cfg.data_dir:
        _length_from_data(cfg)
    if cfg.max_decoding_length is None:
        cfg.max_decoding_length = cfg.max_seq_length
        cfg.sources["max_decoding_length"] = "max_seq_length"
    check_train_config(cfg)
    return cfg


def _with_lr(opt, lr, name: str):
    """A copy of the config's `opt` with the optimizer's peak rate `lr`."""
    if not isinstance(opt, dict):
        raise UserError(f"--lr needs an opt dict in training config {name}: start "
                        f"from configs/config_train.py")
    opt = copy.deepcopy(opt)
    optimizer = opt.setdefault("optimizer", {})
    if not isinstance(optimizer, dict):
        raise UserError(f"--lr: opt['optimizer'] in training config {name} is not a dict")
    optimizer.setdefault("kwargs", {})["lr"] = lr
    return opt


def _where(cfg: TrainConfig, key: str) -> str:
    """How a message names the place a setting was given."""
    return f"--{key}" if cfg.sources.get(key) == FROM_FLAG else \
        f"{key} = {getattr(cfg, key)!r} in {cfg.name}"


def _length_from_data(cfg: TrainConfig) -> None:
    """max_seq_length from the data directory's prepared.json (or, for data
    prepared before it existed, from the width of its records); one line when
    the length given differs from the data's."""
    info = read_data_info(cfg.data_dir)
    if info is not None:
        length, origin = info.max_seq_length, info.path
    else:
        found = [split_data_path(cfg.data_dir, split) for split in SPLITS]
        found = [path for path in found if os.path.isfile(path)]
        if cfg.max_seq_length is None and not found:
            raise UserError(f"{cfg.name} leaves max_seq_length to the data, but "
                            f"{cfg.data_dir} holds no prepared data: run prepare_data.py "
                            f"on it first (it records the length), or give "
                            f"--max_seq_length")
        if cfg.max_seq_length is not None or not found:
            return  # the splits, once opened, are checked against the config
        length, origin = PreparedSplit(found[0]).max_seq_length, found[0]
    if cfg.max_seq_length is None:
        cfg.max_seq_length = length
        cfg.sources["max_seq_length"] = f"data ({origin})"
    elif cfg.max_seq_length != length:
        given = cfg.max_seq_length
        leave_out = ("leave --max_seq_length out" if cfg.sources["max_seq_length"]
                     == FROM_FLAG else f"set max_seq_length = None in {cfg.name}")
        raise UserError(f"{_where(cfg, 'max_seq_length')} but {cfg.data_dir} was "
                        f"prepared with max_seq_length {length} ({origin}): "
                        f"{leave_out} to use the data's, or run prepare_data.py "
                        f"--data_dir {info.text_dir if info else cfg.data_dir} "
                        f"--max_seq_length {given}")


def parse_set_values(pairs) -> Dict[str, Any]:
    """--set key=value (repeatable) as {field: value}. A value is read as a
    Python literal (8, 1e-4, True, None, "text", [..], {..}) when it is one,
    else kept as text (--set precision=bf16); a key must be a field of the
    training config (or lr, the optimizer's rate), a near miss naming the
    field meant."""
    values = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {pair!r}: write --set key=value, e.g. "
                            f"--set warmup_steps=100")
        if key not in SETTABLE + (LR_SETTING,):  # --set lr=... is --lr
            meant = closest_field(key, SETTABLE + (LR_SETTING,))
            hint = (f"did you mean {meant}?" if meant else
                    "the settings are listed in configs/config_train.py")
            raise UserError(f"--set {key}: no such training setting ({hint})")
        if key in values:
            raise UserError(f"--set {key} is given twice: keep one")
        try:
            values[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            values[key] = text
    return values


def describe_settings(cfg: TrainConfig) -> List[str]:
    """The settings in force, one line each, with where each came from."""
    shown = [(key, getattr(cfg, key)) for key in SETTABLE if key != "opt"]
    optimizer = cfg.opt.get("optimizer", {}) if isinstance(cfg.opt, dict) else {}
    kwargs = dict(optimizer.get("kwargs", {}))
    shown.append((LR_SETTING, kwargs.pop("lr", None)))
    shown.append(("opt", f"{optimizer.get('type', 'AdamW')} {kwargs}, gradient_clip "
                         f"{cfg.opt.get('gradient_clip', {})}"))
    width = max(len(key) for key, _ in shown)
    lines = [f"Settings of this run (training config {cfg.name}; 'flag': the command "
             f"line):"]
    for key, value in shown:
        source = cfg.sources.get(key, cfg.sources.get("opt", FROM_DEFAULT))
        text = value if key == "opt" else repr(value)
        lines.append(f"  {key:<{width}} = {text}  ({source})")
    return lines


def _note_original_pipeline(module, name: str) -> None:
    unused = [key for key in _ORIGINAL_PIPELINE if key in settings_of(module)]
    if unused:
        print(f"note: training config {name} sets {', '.join(unused)} (the original "
              f"example's texar data pipeline), which this trainer does not read: "
              f"batches come from train_batch_size, eval_batch_size and "
              f"test_batch_size, shuffled every epoch", file=sys.stderr)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_or_off(steps: int) -> bool:
    """A step setting's value: 1 or more, or -1 for off (0 is no step count)."""
    return steps >= 1 or steps == -1


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
    for key in STEP_SETTINGS:
        if not _is_int(getattr(cfg, key)) or not _positive_or_off(getattr(cfg, key)):
            bad(key, "must be a positive number of steps, or -1 to turn it off")
    if (not _is_int(cfg.early_stopping_patience)
            or not _positive_or_off(cfg.early_stopping_patience)):
        bad("early_stopping_patience", "must be a positive number of evaluations, or "
                                       "-1 to turn early stopping off")
    if not _is_int(cfg.seed):
        bad("seed", "must be an integer")
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
    if cfg.lora is not None:
        lora_of(cfg)
    if not isinstance(cfg.shard_model, bool):
        bad("shard_model", "must be True or False")
    if cfg.tensorboard_dir is not None:
        if not isinstance(cfg.tensorboard_dir, str) or not cfg.tensorboard_dir:
            bad("tensorboard_dir", "must be a directory path, or None for no TensorBoard log")
        check_tensorboard_installed(f"tensorboard_dir in training config {cfg.name}")
    _check_opt(cfg)


def lora_of(cfg: TrainConfig) -> Optional[LoraSettings]:
    """The checked LoRA settings of the config, None without `lora`."""
    if cfg.lora is None:
        return None
    return lora_settings(cfg.lora, f"lora in training config {cfg.name}")


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
