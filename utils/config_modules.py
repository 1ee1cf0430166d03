"""Config modules (`--config_model`, `--config_train`): plain Python modules
whose top-level names are the settings (the Texar examples' style), loaded by
module name or `.py` path, and the names they set.

`--config_model configs.config_model_345M` and `--config_model my/conf.py`
both work, as do `--config_train` values. A bare name that is no importable
module is looked up under configs/ too, so the original example's
`--config_train=config_train` finds configs.config_train. A config that
raises or calls exit() while loading is a one-line error.

Every public value a config module sets must be a field of that config
(`check_config_names`): a setting nobody reads is a setting the user believes
in (`gradient_checkpoint = True`, meant: gradient_checkpointing, would train
without checkpointing). A config's own helpers stay allowed: names starting
with `_`, imported modules, functions and classes (`settings_of`).
"""
import difflib
import importlib
import importlib.util
import os
import types
from typing import Iterable, List, Optional, Tuple

from utils.errors import UserError

CONFIG_PACKAGE = "configs"


def load_config_module(name_or_path: str) -> types.ModuleType:
    """Import a config by dotted module name or by file path."""
    if not name_or_path:
        raise UserError("empty config name: pass a module such as "
                        "configs.config_model_117M or a path to a .py file")
    looks_like_path = name_or_path.endswith(".py") or os.sep in name_or_path
    if looks_like_path:
        return _load_file(name_or_path)
    candidates = [name_or_path]
    if "." not in name_or_path:  # `config_train` as the original example wrote it
        candidates.append(f"{CONFIG_PACKAGE}.{name_or_path}")
    for candidate in candidates:
        module = _import_module(candidate, name_or_path)
        if module is not None:
            return module
    raise UserError(f"unknown config '{name_or_path}'"
                    + (f" (also tried {candidates[1]})" if len(candidates) > 1 else "")
                    + ": give a module under configs/ (e.g. configs.config_model_117M) "
                      "or a path to a .py file")


def _load_file(path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    module_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    # SystemExit is no Exception: a config calling sys.exit() is caught too.
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # a syntax error, a bad import, exit()...
        raise UserError(f"config file {path} failed to load: "
                        f"{_describe(err)}: fix the config") from None
    return module


def _import_module(module_name: str, given: str):
    """The module, or None when `module_name` itself does not exist."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Missing: the module or a package on its way (not an import inside it).
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            return None
        raise UserError(f"config '{given}' ({module_name}) failed to import: "
                        f"{err}: fix the config") from None
    except (Exception, SystemExit) as err:
        raise UserError(f"config '{given}' ({module_name}) failed to load: "
                        f"{_describe(err)}: fix the config") from None


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return f"it called exit({err.code!r}); a config may only set values"
    return f"{type(err).__name__}: {err}"


def settings_of(module: types.ModuleType) -> List[str]:
    """The names a config module sets: no private (_x) or dunder names, modules,
    functions or classes."""
    return [name for name, value in vars(module).items()
            if not name.startswith("_")
            and not isinstance(value, (types.ModuleType, type))
            and not callable(value)]


def misspelt_settings(names: Iterable[str], known: Iterable[str]) -> List[Tuple[str, str]]:
    """(name, the known name it most likely misspells) for names that are not
    known but nearly are: a letter or two added, dropped, swapped or in
    another case. Names further from every known one are left alone (a
    config may hold helper values of its own)."""
    known = list(known)
    lowered = {k.lower(): k for k in known}
    found = []
    for name in names:
        if name in known:
            continue
        if name.lower() in lowered:
            found.append((name, lowered[name.lower()]))
            continue
        close = [k for k in difflib.get_close_matches(name.lower(), list(lowered), n=3,
                                                      cutoff=0.85)
                 if abs(len(k) - len(name)) <= 2]
        if close:
            found.append((name, lowered[close[0]]))
    return found


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

