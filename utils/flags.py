"""Command-line flags shared by gpt2_generate_main.py and gpt2_train_main.py,
the value rules behind them, and config loading.

Both scripts choose weights the same way (--config_model, --pretrain_model_dir,
--pretrain_checkpoint, --checkpoint) and sample the same way (--temperature,
--top_k, ...). The flags, their help and every numeric bound live here once:
`SamplingSettings.from_flags` checks the sampling flags and `check` the lengths
and memory once the model's size is known; `utils.generation.generate` applies
the same value checks (`check_decoding_values`) to its arguments.

Configs (`--config_model`, `--config_train`) are plain Python modules given as
a module name or a path to a `.py` file; see `load_config_module`.
"""
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from utils.errors import UserError
from utils.sampling import SMALLEST_TEMPERATURE

# Upper bound for --batch_size and --beam_width: far beyond what any memory
# holds (the memory check refuses much less), it keeps size arithmetic sane.
MAX_ROWS = 2 ** 31 - 1
# Seeds, for sampling and training alike: numpy.random.seed takes no larger.
MAX_SEED = 2 ** 32 - 1
# texar's length penalty is ((5 + length) / 6) ** alpha: beyond this it
# overflows a float (or underflows to 0) for lengths within GPT-2's 1024.
LENGTH_PENALTY_LIMIT = 10.0
DECODING_STRATEGIES = ("greedy", "sample", "beam")
GENERATION_MEMORY_FIX = ("use a smaller --batch_size, --beam_width or "
                         "--max_decoding_length, or --dtype bfloat16")
WEIGHT_FLAGS = ("config_model", "pretrain_model_dir", "pretrain_checkpoint",
                "checkpoint")


# ---------------------------------------------------------------------------
# Value rules (shared with utils.generation.generate)

def check_decoding_values(strategy: str, temperature: float, top_k: int,
                          top_p: float, beam_width: int,
                          length_penalty: float) -> None:
    """One-line UserError for a decoding value that cannot work."""
    if strategy not in DECODING_STRATEGIES:
        raise UserError(f"unknown decoding strategy {strategy!r}: use one of "
                        f"{', '.join(DECODING_STRATEGIES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be > 0 (got {temperature}): a "
                        f"finite number such as 0.7; lower is more conservative")
    if temperature < SMALLEST_TEMPERATURE:
        raise UserError(f"--temperature {temperature} is too small to divide "
                        f"by in float32 (at least {SMALLEST_TEMPERATURE:.3g}): for "
                        f"the most likely token every time use --decoding_strategy "
                        f"greedy")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (got {top_k}); 0 disables it")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (got {top_p}); 1 disables it")
    if not 1 <= beam_width <= MAX_ROWS:
        raise UserError(f"--beam_width must be between 1 and {MAX_ROWS} "
                        f"(got {beam_width})")
    if not (math.isfinite(length_penalty) and abs(length_penalty) <= LENGTH_PENALTY_LIMIT):
        raise UserError(f"--length_penalty must be a number between "
                        f"-{LENGTH_PENALTY_LIMIT:g} and {LENGTH_PENALTY_LIMIT:g} "
                        f"(got {length_penalty}); 0 turns it off")


def check_seed(seed: Optional[int], name: str = "--seed") -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"{name} must be between 0 and {MAX_SEED} (got {seed})")


def check_length_fits(max_decoding_length: int, n_ctx: int,
                      setting: str = "--max_decoding_length") -> None:
    """The sample length, context included, must fit the model's positions."""
    if not 2 <= max_decoding_length <= n_ctx:
        raise UserError(f"{setting} must be between 2 and the model's {n_ctx} "
                        f"positions, its n_ctx (got {max_decoding_length})")


def check_context_room(subject: str, length: int, max_decoding_length: int,
                       fix: str) -> None:
    """A context must leave room for one new token within max_decoding_length.
    `subject` begins the message ('context 1 has', 'the prompt is')."""
    if length >= max_decoding_length:
        raise UserError(f"{subject} {length} tokens, leaving no room for a new token "
                        f"within max_decoding_length {max_decoding_length} (which "
                        f"counts the context): {fix}")


def check_batching(nsamples: int, batch_size: int) -> None:
    """gpt2_generate_main.py's --nsamples and --batch_size."""
    if nsamples < 1 or batch_size < 1:
        raise UserError("--nsamples and --batch_size must be at least 1")
    if batch_size > MAX_ROWS:
        raise UserError(f"--batch_size must be at most {MAX_ROWS} (got {batch_size})")
    if nsamples % batch_size:
        raise UserError(f"--nsamples ({nsamples}) must be divisible by "
                        f"--batch_size ({batch_size})")


# ---------------------------------------------------------------------------
# The flags

def add_weight_args(group, *, checkpoint_help: str, config_model_help: str) -> None:
    """--config_model, --pretrain_model_dir, --pretrain_checkpoint, --checkpoint."""
    from utils.download import default_model_dir
    from utils.weights import DEFAULT_MODEL_NAME
    group.add_argument("--config_model", default=None, help=config_model_help)
    group.add_argument("--pretrain_model_dir", default=None,
                       help=f"Directory of OpenAI's GPT-2 files, or a Hugging Face "
                            f"GPT-2 directory (config.json + model.safetensors), "
                            f"or hf:NAME to fetch one from the Hugging Face Hub "
                            f"(needs huggingface_hub). Default "
                            f"{default_model_dir(DEFAULT_MODEL_NAME)}, or the size "
                            f"--config_model names.")
    group.add_argument("--pretrain_checkpoint", default=None,
                       help="OpenAI checkpoint prefix (default: "
                            "<pretrain_model_dir>/model.ckpt); ignored with "
                            "--checkpoint.")
    group.add_argument("--checkpoint", default=None, help=checkpoint_help)


def add_sampling_args(group, *, max_decoding_length_default, max_decoding_length_help):
    """The decoding flags: length, temperature, top-k/top-p, strategy, beam, seed."""
    group.add_argument("--max_decoding_length", type=int,
                       default=max_decoding_length_default,
                       help=max_decoding_length_help)
    group.add_argument("--temperature", type=float, default=0.7,
                       help="Softmax temperature, a finite number > 0 (at least "
                            "1.2e-38); lower is more conservative (default 0.7).")
    group.add_argument("--top_k", type=int, default=None,
                       help="Sample among the k most likely tokens (0: all). "
                            "Default 40, or 0 when --top_p is given (as in the "
                            "original example, top-p then replaces top-k).")
    group.add_argument("--top_p", type=float, default=1.0,
                       help="Nucleus sampling: the smallest set of tokens whose "
                            "probability reaches p (1.0: off).")
    group.add_argument("--decoding_strategy", default="sample",
                       choices=DECODING_STRATEGIES,
                       help="sample (temperature/top-k/top-p), greedy, or beam "
                            "search.")
    group.add_argument("--beam_width", type=int, default=4,
                       help="Beams kept by --decoding_strategy beam.")
    group.add_argument("--length_penalty", type=float, default=0.0,
                       help="Beam search length penalty alpha, between -10 and 10 "
                            "(0: off).")


def weight_flags(args) -> Dict[str, Any]:
    """The weight flags as keyword arguments of utils.weights.resolve_model."""
    flags = {name: getattr(args, name) for name in WEIGHT_FLAGS}
    flags["from_scratch"] = getattr(args, "from_scratch", False)
    return flags


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The sampling flags, checked once; top_k's default settled."""
    max_decoding_length: Optional[int]   # None: the caller's default
    strategy: str
    temperature: float
    top_k: int
    top_p: float
    beam_width: int
    length_penalty: float
    seed: Optional[int]
    batch_size: int = 1                  # rows generated together
    dtype: str = "float32"               # the weights' precision while generating
    # Where the user sets max_decoding_length, for messages.
    length_setting: str = "--max_decoding_length"

    @classmethod
    def from_flags(cls, args, **extra) -> "SamplingSettings":
        """Check the flags of add_sampling_args (and --seed) before a model is
        loaded. --top_k defaults to 40, or to 0 when --top_p is given (as in
        the original example, top-p then replaces top-k)."""
        top_k = args.top_k if args.top_k is not None else (0 if args.top_p < 1 else 40)
        check_decoding_values(args.decoding_strategy, args.temperature, top_k,
                              args.top_p, args.beam_width, args.length_penalty)
        check_seed(args.seed)
        if args.max_decoding_length is not None and args.max_decoding_length < 2:
            raise UserError(f"--max_decoding_length must be at least 2 "
                            f"(got {args.max_decoding_length})")
        return cls(max_decoding_length=args.max_decoding_length,
                   strategy=args.decoding_strategy, temperature=args.temperature,
                   top_k=top_k, top_p=args.top_p, beam_width=args.beam_width,
                   length_penalty=args.length_penalty, seed=args.seed, **extra)

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)

    def check(self, n_ctx: int, longest_context: int, *,
              sizes: Optional[Mapping[str, int]] = None, device=None,
              model: Optional[str] = None) -> None:
        """Refuse a length the model cannot hold, and with the model's `sizes`
        (known before its weights are read) a batch or beam that `device`'s
        free memory cannot hold (utils.generation.generation_memory);
        `model` names it in that message."""
        check_length_fits(self.max_decoding_length, n_ctx, self.length_setting)
        check_context_room("the longest context has", longest_context,
                           self.max_decoding_length,
                           f"raise {self.length_setting} (at most {n_ctx}) or "
                           f"shorten the contexts")
        if sizes is not None:
            import torch
            from utils.generation import require_generation_memory
            require_generation_memory(
                sizes, batch_size=self.batch_size,
                max_decoding_length=self.max_decoding_length,
                prompt_length=longest_context, strategy=self.strategy,
                beam_width=self.beam_width, dtype=getattr(torch, self.dtype),
                device=device, fix=GENERATION_MEMORY_FIX, model=model)

    def generate_kwargs(self) -> Dict[str, Any]:
        """utils.generation.generate's keyword arguments for these settings."""
        return dict(strategy=self.strategy, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p, beam_width=self.beam_width,
                    length_penalty=self.length_penalty)


# ---------------------------------------------------------------------------
# Config modules: `--config_model configs.config_model_345M` and
# `--config_model my/conf.py` both work, as do `--config_train` values. A bare
# name that is no importable module is looked up under configs/ too, so the
# original example's `--config_train=config_train` finds configs.config_train.
# Configs are plain Python modules whose top-level names are the settings (the
# Texar examples' style); one that raises or calls exit() while loading is a
# one-line error.

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
