"""Load a Python config module given as a module name or a path to a `.py` file.

`--config_model configs.config_model_345M` and `--config_model my/conf.py` both
work, as do `--config_train` values. Configs are plain Python modules whose
top-level names are the settings (the Texar examples' style).
"""
import importlib
import importlib.util
import os
import types

from utils.errors import UserError


def load_config_module(name_or_path: str) -> types.ModuleType:
    """Import a config by dotted module name or by file path."""
    if not name_or_path:
        raise UserError("empty config name: pass a module such as "
                        "configs.config_model_117M or a path to a .py file")
    looks_like_path = name_or_path.endswith(".py") or os.sep in name_or_path
    if looks_like_path:
        if not os.path.isfile(name_or_path):
            raise UserError(f"config file not found: {name_or_path}")
        module_name = "_config_" + os.path.splitext(
            os.path.basename(name_or_path))[0]
        spec = importlib.util.spec_from_file_location(module_name, name_or_path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # a config with a syntax error, a bad import...
            raise UserError(f"config file {name_or_path} failed to load: "
                            f"{type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(name_or_path)
    except ModuleNotFoundError as err:
        if err.name and name_or_path.startswith(err.name):
            raise UserError(
                f"unknown config '{name_or_path}': give a module under configs/ "
                f"(e.g. configs.config_model_117M) or a path to a .py file") from err
        raise UserError(f"config '{name_or_path}' failed to import: {err}") from err
    except Exception as err:
        raise UserError(f"config '{name_or_path}' failed to load: "
                        f"{type(err).__name__}: {err}") from err
