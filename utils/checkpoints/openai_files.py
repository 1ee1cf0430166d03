"""OpenAI's GPT-2 model files: their names, where they live, and what a usable one is.

A model is named as in the original Texar example (117M, 345M, 774M, 1558M);
OpenAI has since renamed the first two 124M and 355M on its storage
(`REMOTE_NAMES`), and both spellings (and the Hugging Face names gpt2,
gpt2-medium, ...) are accepted by `canonical_model_name`.

The default place of a model is gpt2_pretrained_models/model_<NAME>
(`default_model_dir`), spelled here only; `model_name_of_dir` reads a model
name back from such a directory name.

`check_model_file` says what is wrong with one file, if anything:
hparams.json and encoder.json must be JSON objects of the right shape,
`checkpoint` must name a model_checkpoint_path, vocab.bpe must be a
'#version' header and merge lines, model.ckpt.index must parse with our
checkpoint reader, and the data file must be exactly as long as that index
says. Any file that is empty or is an HTML page (a captive portal's, a
proxy's) is refused.
"""
import os
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from utils.checkpoints.tf_reader import (DEFAULT_PREFIX, REDOWNLOAD, STATE_FILE,
                                         TFCheckpointError, data_shard_sizes)
from utils.errors import UserError
from utils.json_file import read_json_object, read_small_text
from utils.model import SIZE_KEYS
from utils.processor import ENCODER_FILE, MERGES_FILE

# OpenAI's seven files: TF's state file and checkpoint bundle, the sizes,
# and the vocabulary (named in utils/processor.py).
HPARAMS_FILE = "hparams.json"
INDEX_FILE = DEFAULT_PREFIX + ".index"
DATA_FILE = DEFAULT_PREFIX + ".data-00000-of-00001"
META_FILE = DEFAULT_PREFIX + ".meta"
MODEL_FILES = (STATE_FILE, ENCODER_FILE, HPARAMS_FILE,
               DATA_FILE, INDEX_FILE, META_FILE, MERGES_FILE)
DEFAULT_MODEL = "117M"

# The original example's layout: <MODELS_DIR>/<MODEL_DIR_PREFIX><NAME>.
MODELS_DIR = "gpt2_pretrained_models"
MODEL_DIR_PREFIX = "model_"
# For help texts: the default directory of any model.
DEFAULT_MODEL_DIR_PATTERN = os.path.join(MODELS_DIR, MODEL_DIR_PREFIX + "<MODEL>")

# Local name (the original example's) -> the folder name on OpenAI's storage.
REMOTE_NAMES = {"117M": "124M", "345M": "355M", "774M": "774M", "1558M": "1558M"}
_ALIASES = {
    "117m": "117M", "124m": "117M", "gpt2": "117M", "gpt2-small": "117M",
    "345m": "345M", "355m": "345M", "gpt2-medium": "345M",
    "774m": "774M", "gpt2-large": "774M",
    "1558m": "1558M", "1.5b": "1558M", "gpt2-xl": "1558M",
}


# ---------------------------------------------------------------------------
# Names and directories

def canonical_model_name(name: str) -> str:
    """'124M', 'gpt2-small', 'gpt2' or '117M' -> '117M'; unknown names -> UserError."""
    canonical = _ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise UserError(
            f"unknown GPT-2 model '{name}': use one of 117M (124M, gpt2), "
            f"345M (355M, gpt2-medium), 774M (gpt2-large), 1558M (gpt2-xl)")
    return canonical


def default_model_dir(name: str) -> str:
    """Where the original example keeps a model: gpt2_pretrained_models/model_<NAME>."""
    return os.path.join(MODELS_DIR, MODEL_DIR_PREFIX + canonical_model_name(name))


def model_name_of_dir(model_dir: str, prefix_optional: bool = False) -> Optional[str]:
    """The canonical model name a directory named model_<NAME> holds ('.../model_345M'
    -> '345M', 'model_gpt2' -> '117M'); None for any other directory name.

    `prefix_optional`: a directory named just the model ('345M', 'gpt2') counts too.
    """
    base = os.path.basename(os.path.normpath(model_dir))
    if base.startswith(MODEL_DIR_PREFIX):
        base = base[len(MODEL_DIR_PREFIX):]
    elif not prefix_optional:
        return None
    try:
        return canonical_model_name(base)
    except UserError:
        return None


# ---------------------------------------------------------------------------
# What a complete, usable file looks like

_HTML_START = re.compile(rb"\s*(<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>])",
                         re.IGNORECASE)
_CHECKPOINT_LINE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"[^"]+"', re.MULTILINE)


def looks_like_html(head: bytes) -> bool:
    """Whether a body starts like a web page (no model file does)."""
    return bool(_HTML_START.match(head.lstrip(b"\xef\xbb\xbf")[:512]))


def _check_hparams(path: str) -> None:
    missing = [k for k in SIZE_KEYS if k not in read_json_object(path)]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")


def _check_encoder(path: str) -> None:
    encoder = read_json_object(path)
    if not encoder or not all(type(v) is int for v in encoder.values()):
        raise ValueError("is not a JSON object mapping tokens to integer ids")


def _check_checkpoint_state(path: str) -> None:
    if not _CHECKPOINT_LINE.search(read_small_text(path)):
        raise ValueError('has no model_checkpoint_path: "..." line')


def _check_merges(path: str) -> None:
    lines = read_small_text(path).split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError("does not start with a '#version' line")
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() and len(line.split()) != 2:
            raise ValueError(f"line {number} is not two tokens separated by a space")
    if len(lines) < 2 or not any(line.strip() for line in lines[1:]):
        raise ValueError("holds no merges")


def _index_reason(err: TFCheckpointError, path: str) -> str:
    """The reader's message without its path and its 'download again' advice."""
    text = str(err).replace(path, "it")
    return re.sub(r"[;:,]\s*(the download was probably interrupted: )?"
                  + re.escape(REDOWNLOAD) + r"\s*$", "", text)


def _check_index(path: str) -> None:
    try:
        num_shards, _ = data_shard_sizes(path)
    except TFCheckpointError as err:
        raise ValueError(f"is not a readable checkpoint index ({_index_reason(err, path)})"
                         ) from None
    if num_shards != 1:
        raise ValueError(f"names {num_shards} data files; a GPT-2 model has one ({DATA_FILE})")


def _check_data(path: str) -> None:
    """The data file is as long as the index beside it says (when that index is usable)."""
    index = os.path.join(os.path.dirname(path), INDEX_FILE)
    try:
        num_shards, ends = data_shard_sizes(index)
    except TFCheckpointError:
        return  # no usable index yet: the index's own check gets it fetched again
    expected, size = ends.get(0, 0), os.path.getsize(path)
    if num_shards == 1 and size != expected:
        raise ValueError(f"is {size} bytes but {INDEX_FILE} says {expected}")


_CHECKS: Dict[str, Callable[[str], None]] = {
    HPARAMS_FILE: _check_hparams,
    ENCODER_FILE: _check_encoder,
    STATE_FILE: _check_checkpoint_state,
    MERGES_FILE: _check_merges,
    INDEX_FILE: _check_index,
    DATA_FILE: _check_data,
}


def check_model_file(path: str, kind: Optional[str] = None) -> Optional[str]:
    """What is wrong with model file `path` (e.g. "is not valid JSON (...)"), or None.

    `kind` is the model file it should be (default: its base name), so a
    `.partial` can be checked before it is renamed. The data file is checked
    against model.ckpt.index in the same directory.
    """
    kind = kind or os.path.basename(path)
    try:
        if not os.path.isfile(path):
            return "is missing"
        if os.path.getsize(path) == 0:
            return "is empty"
        with open(path, "rb") as f:
            if looks_like_html(f.read(1024)):
                return "is an HTML page, not the model file"
        check = _CHECKS.get(kind)
        if check:
            check(path)
    except ValueError as err:
        return str(err)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None


def checking_order(files: Iterable[str]) -> List[str]:
    """Small files first, the weights last: the data file is checked against the index."""
    return sorted(dict.fromkeys(files), key=lambda name: name == DATA_FILE)


def file_problems(model_dir: str, files: Sequence[str] = MODEL_FILES) -> Dict[str, str]:
    """{file: what is wrong with it} for the files of `files` that `model_dir` lacks
    or that fail their check; empty when all of them are usable."""
    problems = {}
    for name in checking_order(files):
        problem = check_model_file(os.path.join(model_dir, name), name)
        if problem:
            problems[name] = problem
    return problems
