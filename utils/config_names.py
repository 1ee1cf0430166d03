"""Every value a config module sets must be a field of that config.

A setting nobody reads is a setting the user believes in: `gradient_checkpoint
= True` (meant: gradient_checkpointing) would train without checkpointing, and
a field of a feature that does not exist (`shard_model = True`) would train as
if it were not there. So every public name a config module sets must be one of
its fields. A config's own helpers stay allowed: names starting with `_`,
imported modules, functions and classes (`utils.flags.settings_of`).
"""
import difflib
import types
from typing import Iterable, Optional

from utils.errors import UserError
from utils.flags import misspelt_settings, settings_of

# How alike (difflib's ratio) a name must be to a field to be offered as the
# one meant; `shard_model` resembles no training field that closely.
_SUGGESTION_CUTOFF = 0.75


def closest_field(name: str, fields: Iterable[str]) -> Optional[str]:
    """The field `name` most likely misspells, or None when none is close."""
    fields = list(fields)
    typo = misspelt_settings([name], fields)
    if typo:
        return typo[0][1]
    lowered = {f.lower(): f for f in fields}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1,
                                      cutoff=_SUGGESTION_CUTOFF)
    return lowered[close[0]] if close else None


def check_config_names(module: types.ModuleType, fields: Iterable[str],
                       what: str, listed_in: str) -> None:
    """One UserError naming every public value of `module` that is not one of
    `fields`, with the field meant where one is close. `what` names the
    config in the message ("training config my.py"); `listed_in` is the file
    that lists the fields."""
    fields = list(fields)
    unknown = [name for name in settings_of(module) if name not in fields]
    if not unknown:
        return
    meant = {name: closest_field(name, fields) for name in unknown}
    typos = [f"{name} (did you mean {meant[name]}?)" for name in unknown if meant[name]]
    if typos:  # the likeliest mistake first: a misspelt field
        raise UserError(f"{what} sets {', '.join(typos)}, which "
                        f"{'is not a setting' if len(typos) == 1 else 'are not settings'}"
                        f": fix the name (the settings are listed in {listed_in})")
    alone = len(unknown) == 1
    raise UserError(f"{what} sets {', '.join(unknown)}: no such setting "
                    f"{'exists' if alone else 'exist'}, so {'it' if alone else 'they'} "
                    f"would be ignored: remove {'it' if alone else 'them'} (the "
                    f"settings are listed in {listed_in}), or start a helper value's "
                    f"name with _")

