"""`hf:NAME`: a GPT-2 on the Hugging Face Hub, fetched into the usual cache.

`--pretrain_model_dir hf:openai-community/gpt2` (and convert_checkpoint.py's
SRC) name a Hub repository instead of a directory. When the optional
`huggingface_hub` package is installed, its `snapshot_download` fetches only
the files this project reads (config.json, the safetensors weights, the
tokenizer's vocab.json/merges.txt and small JSON files) into its own cache
(~/.cache/huggingface/hub, or under $HF_HOME) and the snapshot directory is
used like any local Hugging Face directory. A repository already cached works
offline (HF_HUB_OFFLINE=1). Not installed, or offline with nothing cached, or
any download failure: one line saying how to get the directory by hand.

Fetching is in two steps, as for OpenAI's files: the small files first (the
sizes tell whether the model fits before gigabytes are downloaded), then the
weights, pinned to the same revision.
"""
import os
import re
import textwrap
from typing import Optional

from utils.errors import UserError

HUB_PREFIX = "hf:"
_SMALL_FILES = ["config.json", "generation_config.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json"]
_WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]
# A Hub repository id: NAME or OWNER/NAME.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def is_hub_name(value: Optional[str]) -> bool:
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def _how_to_get(repo_id: str) -> str:
    return (f"download it with `huggingface-cli download {repo_id} --local-dir DIR` "
            f"(pip install huggingface_hub) and pass DIR instead of {HUB_PREFIX}{repo_id}")


def hub_repo_id(spec: str) -> str:
    """The repository id of `hf:NAME`, checked."""
    repo_id = spec[len(HUB_PREFIX):]
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise UserError(f"{spec!r} is not a Hugging Face model name: write "
                        f"{HUB_PREFIX}NAME or {HUB_PREFIX}OWNER/NAME, e.g. "
                        f"{HUB_PREFIX}openai-community/gpt2")
    return repo_id


def fetch_hub_model(spec: str, weights: bool, revision: Optional[str] = None) -> str:
    """The local snapshot directory of `hf:NAME`, with its small files (and its
    weights when `weights`), downloaded into the Hugging Face cache if needed."""
    repo_id = hub_repo_id(spec)
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise UserError(f"{spec} needs the optional package huggingface_hub, which is "
                        f"not installed: pip install huggingface_hub, or "
                        f"{_how_to_get(repo_id)}") from None
    patterns = _SMALL_FILES + (_WEIGHT_FILES if weights else [])
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as err:  # offline, unknown repository, gated, network...
        offline = " (offline: HF_HUB_OFFLINE is set and it is not cached)" \
            if constants.HF_HUB_OFFLINE else ""
        # The first line, cut at a word: the fix after it must stay readable.
        reason = textwrap.shorten(str(err).strip().splitlines()[0], 160,
                                  placeholder=" ...") if str(err).strip() else ""
        raise UserError(f"cannot fetch {spec} from the Hugging Face Hub{offline} "
                        f"({type(err).__name__}: {reason}); {_how_to_get(repo_id)}") from None


def snapshot_revision(snapshot_dir: str) -> str:
    """The commit a snapshot directory holds (its name in the cache)."""
    return os.path.basename(os.path.normpath(snapshot_dir))
