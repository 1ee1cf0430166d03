"""A resumed run's settings: the config given now applies, and every change is named.

A training checkpoint keeps what cannot be recomputed (weights, optimizer
moments, step, data position, random states) and a copy of the training config
it ran with (`config_snapshot`). Resuming with --checkpoint takes every
setting from the --config_train given now, the optimizer's hyperparameters
included: torch's `optimizer.load_state_dict` would put back the checkpoint's
weight_decay, betas, eps..., so `optimizer_settings` / `apply_optimizer_settings`
restore the config's after it (the learning rate is set every step from the
config anyway). Every setting that differs from the checkpoint's is named in
one note (`changed_settings`), so that a change is never silent; to keep the
checkpoint's settings, resume with the config it was trained with.
"""
import dataclasses
from typing import Any, Dict, List, Optional

from utils.training.optimizer import opt_hparams

# Optimizer group entries that are no setting: the parameters themselves, and
# the learning rate, which the schedule sets before every step.
_NOT_SETTINGS = ("params", "lr", "initial_lr")
_UNSET = "(unset)"


def config_snapshot(cfg) -> Dict[str, Any]:
    """The training config's settings as plain values (they load with
    torch.load(weights_only=True)); `opt` with texar's defaults filled in, so
    that spelling a default out is no change."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.compare}
    values["opt"] = opt_hparams(cfg.opt).todict()
    return _plain(values)


# texar's hparams choose a class by a "type" key; a checkpoint names none
# (tests/test_checkpoint_trust.py), so the snapshot spells it "class_name".
_TYPE_KEY, _STORED_TYPE_KEY = "type", "class_name"


def _plain(value: Any) -> Any:
    """`value` as dicts, lists and scalars; anything else as its repr."""
    if isinstance(value, dict):
        return {(_STORED_TYPE_KEY if key == _TYPE_KEY else str(key)): _plain(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _flatten(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts as one dict of dotted names (opt.optimizer.kwargs.lr)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(saved: Dict[str, Any], now: Dict[str, Any],
                     leave_out: tuple = ()) -> List[str]:
    """'name old -> new' for every setting that differs between two
    snapshots (or optimizer settings), nested ones by dotted name; names in
    `leave_out` (said elsewhere) are skipped."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    names = list(flat_now) + [name for name in flat_saved if name not in flat_now]
    return [f"{name} {_show(flat_saved.get(name, _UNSET))} -> "
            f"{_show(flat_now.get(name, _UNSET))}"
            for name in names
            if name not in leave_out
            and flat_saved.get(name, _UNSET) != flat_now.get(name, _UNSET)]


def _show(value: Any) -> str:
    return value if value == _UNSET else repr(value)


def optimizer_settings(optimizer) -> List[Dict[str, Any]]:
    """Each parameter group's hyperparameters, as the config built them."""
    return [{key: value for key, value in group.items() if key not in _NOT_SETTINGS}
            for group in optimizer.param_groups]


def apply_optimizer_settings(optimizer, settings: List[Dict[str, Any]]) -> None:
    """Put `settings` (from optimizer_settings) back into the groups, after
    load_state_dict replaced them with the checkpoint's."""
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)


def changed_optimizer_settings(saved_groups: Optional[List[Dict[str, Any]]],
                               now: List[Dict[str, Any]]) -> List[str]:
    """For a checkpoint that holds no config snapshot: the optimizer
    hyperparameters that differ from those of its saved parameter groups."""
    changes = []
    for index, (saved, values) in enumerate(zip(saved_groups or [], now)):
        saved = {key: value for key, value in saved.items() if key not in _NOT_SETTINGS}
        prefix = "optimizer " if index == 0 else f"optimizer group {index + 1} "
        changes += [prefix + change for change in changed_settings(_plain(saved),
                                                                    _plain(values))]
    return changes


def describe_changes(changes: List[str]) -> str:
    """The note naming `changes` (from changed_settings)."""
    return ("settings differ from the checkpoint's, and the new ones apply: "
            + ", ".join(changes)
            + " (to keep the checkpoint's, resume with the training config it was "
              "trained with)")
