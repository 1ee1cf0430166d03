"""Which GPT-2 weights a run uses, and our own checkpoint format.

Two steps, so that a flag that cannot work fails before gigabytes are read or
downloaded:
1. `resolve_model(...)` applies the scripts' flag precedence (--checkpoint, then
   --from_scratch, then the pretrained model of --pretrain_model_dir: OpenAI's
   checkpoint, downloaded when missing, or a Hugging Face GPT-2 directory,
   told apart by their files; `hf:NAME` fetches one from the Hub, see
   utils/checkpoints/hf_hub.py) and returns a `ResolvedModel`: the model's checked sizes,
   where its weights come from and the tokenizer's directory. Of OpenAI's
   files only hparams.json is fetched, of a Hugging Face model config.json;
   our own checkpoint is read here, once, keeping both its model state and its
   training state.
2. `load_weights(resolved)` builds the GPT2Decoder and fills it.

Our checkpoints, written by gpt2_train_main.py (LAST_CHECKPOINT during training,
BEST_CHECKPOINT at the best dev perplexity), are a `torch.save`d dict of data
only: "model" (the state dict), "model_sizes" (GPT-2's five size numbers as
ints), "model_dropout" (three floats), "with_memory" (a bool: the model keeps
texar's cross-attention, utils/model.py's memory mode; absent means False),
"format" (CHECKPOINT_FORMAT) and the training state (tensors, numbers, strings). They load with `weights_only=True`:
nothing is unpickled. A LoRA run's checkpoints hold adapters instead of
"model" ("lora", "lora_adapters", "lora_base", see utils/lora.py): resolving
one resolves the base model it names (or the one the weight flags give),
and load_weights applies the adapters to it.

A checkpoint never chooses code. texar builds whatever class an hparams "type"
names, so hparams are always rebuilt by `utils.model.gpt2_hparams` from the
checked sizes; older checkpoints that stored texar's "model_hparams" dict are
read for their five sizes and dropout rates only, and the dict goes no further.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from utils import lora
from utils.checkpoints import hf_hub

from utils.checkpoints import openai_weights
from utils.atomic import atomic_write
from utils.errors import UserError
from utils.memory import require_memory
from utils.checkpoints.weight_checks import (check_checkpoint_names, check_finite,
                                             checkpoint_source)
from utils.checkpoints.streaming import CPUTarget, LoadTarget, ParameterFiller
from utils.checkpoints.pages import release_pages
from utils.checkpoints.hf_names import texar_of_hf_tensor
from utils.model import (build_meta_model, build_model, build_peak_bytes, check_dropout, check_sizes,
                         check_sizes_agree, config_with_memory, hparams_from_openai,
                         hparams_from_sizes, load_model_hparams,
                         model_dropout, model_size)
from utils.checkpoints.openai_files import DEFAULT_MODEL, default_model_dir
from utils.checkpoints.hf_dir import CONFIG
from utils.checkpoints.hf_dir import detect_format
from utils.checkpoints.openai_files import model_name_of_dir
from utils.checkpoints.hf_dir import read_hf_config
from utils.checkpoints.download import download_model
from utils.checkpoints.openai_files import DATA_FILE
from utils.checkpoints.openai_files import INDEX_FILE
from utils.checkpoints.openai_files import HPARAMS_FILE
from utils.checkpoints.tf_reader import DEFAULT_PREFIX
from utils.checkpoints.openai_files import MODEL_FILES
from utils.checkpoints.openai_files import file_problems
from utils.checkpoints.hf_dir import iter_hf_tensors
from utils.processor import get_encoder

CHECKPOINT_FORMAT = "gpt2-texar-train-1"
LAST_CHECKPOINT = "model.ckpt"        # the training state, to continue a run
BEST_CHECKPOINT = "model_best.ckpt"   # the weights at the best dev perplexity
DEFAULT_CONFIG_MODEL = "configs.config_model_117M"
# OpenAI's released models, as their hparams.json give them; the configs
# configs/config_model_<name>.py hold the same numbers.
RELEASED_SIZES = {
    "117M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "345M": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}
# Where a ResolvedModel's weights come from.
FROM_CHECKPOINT, FROM_SCRATCH, FROM_OPENAI = "checkpoint", "scratch", "openai"
FROM_HF = "huggingface"


# ---------------------------------------------------------------------------
# Our own checkpoints

def save_checkpoint(path: str, state: Dict[str, Any], replace: bool = True) -> None:
    """torch.save `state` to `path` atomically: a crash leaves the old file whole.
    `replace=False`: an existing file (even one created meanwhile) is kept."""
    with atomic_write(path, "wb", replace=replace) as f:
        torch.save(state, f)


def _checkpoint_is_directory(path: str) -> UserError:
    inside = [name for name in (LAST_CHECKPOINT, BEST_CHECKPOINT)
              if os.path.isfile(os.path.join(path, name))]
    hint = (f"pass a file such as {os.path.join(path, inside[0])}" if inside
            else "pass the .ckpt file gpt2_train_main.py wrote (there is none in it)")
    return UserError(f"--checkpoint {path} is a directory, not a checkpoint file: {hint}")


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by save_checkpoint, loaded without unpickling code."""
    if os.path.isdir(path):
        raise _checkpoint_is_directory(path)
    if not os.path.isfile(path):
        hint = (" (an OpenAI TF checkpoint goes to --pretrain_checkpoint, "
                "not --checkpoint)" if os.path.isfile(path + ".index") else "")
        raise UserError(f"checkpoint not found: {path}{hint}")
    try:
        # Mapped, not read: the weights are read as they are copied into the
        # model, and a training state a run does not use is never read.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, corrupt, or not ours
        raise UserError(f"cannot read checkpoint {path}: it is corrupt or not a "
                        f"checkpoint written by gpt2_train_main.py "
                        f"({type(err).__name__})") from None
    if isinstance(state, dict) and lora.is_adapter_checkpoint(state) and "model" not in state:
        lora.read_adapter_checkpoint(state, path)  # checked here, like "model" below
        return state
    model_state = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model_state, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in model_state.items()):
        raise UserError(f"{path} is not a checkpoint written by gpt2_train_main.py "
                        f"(it has no 'model' dict of named tensors)")
    return state


def checkpoint_model_fields(hparams: Dict[str, Any],
                            with_memory: bool = False) -> Dict[str, Any]:
    """What a checkpoint stores to rebuild its model: plain ints, floats, a bool."""
    return {"model_sizes": model_size(hparams),
            "model_dropout": model_dropout(hparams),
            "with_memory": bool(with_memory)}


def checkpoint_with_memory(state: Dict[str, Any], path: str) -> bool:
    """A checkpoint's "with_memory" (False when absent, as in older ones)."""
    value = state.get("with_memory", False)
    if not isinstance(value, bool):
        raise UserError(f"checkpoint {path}: with_memory must be true or false, not "
                        f"{type(value).__name__}: the file is damaged")
    return value


def hparams_from_checkpoint(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """texar hparams rebuilt by our code from a checkpoint's checked numbers.

    "model_sizes" must be exactly the five sizes as ints. A checkpoint from
    before it existed holds texar's "model_hparams" instead: only its size and
    dropout entries are read, never its "type"s or "kwargs".
    """
    source = f"checkpoint {path}"
    if "model_sizes" in state:
        sizes = check_sizes(state["model_sizes"], f"{source} model_sizes", exact=True)
        dropout = state.get("model_dropout")
        dropout = (check_dropout(dropout, f"{source} model_dropout")
                   if dropout is not None else None)
    elif "model_hparams" in state:  # written before model_sizes existed
        legacy = state["model_hparams"]
        sizes = model_size(legacy, f"{source} model_hparams")
        dropout = model_dropout(legacy, f"{source} model_hparams")
    else:
        raise UserError(f"{path} has no model_sizes: it was not written by "
                        f"gpt2_train_main.py")
    return hparams_from_sizes(sizes, dropout)


# ---------------------------------------------------------------------------
# Step 1: which model, from where

@dataclass
class ResolvedModel:
    """What the weight flags chose, known before any weights are read."""
    sizes: Dict[str, int]      # the five checked sizes (utils.model.model_size)
    hparams: Dict[str, Any]    # texar hparams rebuilt from them
    origin: str                # FROM_CHECKPOINT, FROM_SCRATCH, FROM_OPENAI or FROM_HF
    # Our checkpoint file, OpenAI's prefix or the Hugging Face directory; None from scratch.
    path: Optional[str]
    sizes_from: str            # the file or config the sizes were read from
    vocab_dir: Optional[str]   # pass to utils.processor.get_encoder
    source: str                # where the weights come from, for messages
    download: bool = False     # fetch OpenAI's missing files into a default-named folder
    hub_name: Optional[str] = None  # hf:NAME whose weights are still to fetch
    # From our checkpoint: its weights (handed to the model by load_weights,
    # then dropped), and its training state, None when it holds weights only.
    model_state: Optional[Dict[str, torch.Tensor]] = None
    training_state: Optional[Dict[str, Any]] = None
    with_memory: bool = False  # keep texar's cross-attention (utils/model.py)
    # From an adapter checkpoint (then the fields above describe its base).
    adapters: Optional["Adapters"] = None

    def describe(self) -> str:
        """Where the sizes come from, and the ones memory grows with: for messages."""
        return describe_sizes(self.sizes, self.sizes_from)


@dataclass
class Adapters:
    """An adapter checkpoint's LoRA settings, tensors and base record (utils/lora.py)."""
    settings: lora.LoraSettings
    tensors: Dict[str, torch.Tensor]
    base: Dict[str, Any]
    path: str          # the adapter checkpoint
    base_source: str   # the base model, for messages


def lora_base_of(resolved: ResolvedModel) -> tuple:
    """(kind, path) naming the base model of `resolved` in an adapter
    checkpoint's lora_base; random weights have none."""
    kinds = {FROM_CHECKPOINT: "checkpoint", FROM_OPENAI: "openai", FROM_HF: "huggingface"}
    if resolved.origin not in kinds:
        raise UserError("lora in the training config trains adapters on pretrained "
                        "weights, but --from_scratch gives random ones: drop "
                        "--from_scratch, or remove lora from the training config")
    return kinds[resolved.origin], resolved.hub_name or resolved.path


def describe_sizes(sizes: Dict[str, int], source: str) -> str:
    return (f"{source} (n_layer={sizes['n_layer']}, n_embd={sizes['n_embd']}, "
            f"n_vocab={sizes['n_vocab']})")


@dataclass
class LoadedModel:
    model: nn.Module           # on CPU, in eval mode
    hparams: Dict[str, Any]    # the texar hparams it was built from
    vocab_dir: Optional[str]   # pass to utils.processor.get_encoder
    source: str                # where the weights came from, for messages
    with_memory: bool = False  # has cross-attention (utils/model.py's memory mode)


def default_pretrain_model_dir(config_sizes: Optional[Dict[str, int]]) -> str:
    """The original example's folder for the released model of `config_sizes`
    (the 117M model's when none, or none released, has those sizes)."""
    for name, sizes in RELEASED_SIZES.items():
        if sizes == config_sizes:
            return default_model_dir(name)
    return default_model_dir(DEFAULT_MODEL)


def resolve_model(*, config_model: Optional[str] = None,
                  pretrain_model_dir: Optional[str] = None,
                  pretrain_checkpoint: Optional[str] = None,
                  checkpoint: Optional[str] = None,
                  from_scratch: bool = False,
                  download: bool = True,
                  lora_base: Optional[str] = None) -> ResolvedModel:
    """The model the weight flags ask for: its sizes, source and vocabulary.

    --checkpoint wins over --from_scratch, which wins over OpenAI's checkpoint
    (--pretrain_checkpoint, else <pretrain_model_dir>/model.ckpt). A
    --config_model must agree with the checkpoint's sizes. Nothing large is
    read or downloaded yet, except our own checkpoint (read once, here).
    An adapter checkpoint's base model is the one it names, unless
    --pretrain_model_dir / --pretrain_checkpoint or `lora_base` (a path or
    hf:NAME of any format, told by its files) give another.
    """
    given_model_dir = pretrain_model_dir
    hub_name = pretrain_model_dir if hf_hub.is_hub_name(pretrain_model_dir) else None
    if hub_name:  # its small files now, its weights in load_weights
        pretrain_model_dir = hf_hub.fetch_hub_model(hub_name, weights=False)
    _check_weight_paths(pretrain_model_dir, pretrain_checkpoint)
    config = load_model_hparams(config_model) if config_model else None
    if pretrain_model_dir is None:
        pretrain_model_dir = (os.path.dirname(pretrain_checkpoint) if pretrain_checkpoint
                              else default_pretrain_model_dir(
                                  model_size(config) if config else None))
    vocab_dir = pretrain_model_dir if os.path.isdir(pretrain_model_dir) else None
    if checkpoint:
        resolved = _resolve_checkpoint(checkpoint, vocab_dir, base_flags=dict(
            pretrain_model_dir=hub_name or given_model_dir,
            pretrain_checkpoint=pretrain_checkpoint, download=download,
            lora_base=lora_base))
    elif from_scratch:
        name = config_model or DEFAULT_CONFIG_MODEL
        hparams = config or load_model_hparams(name)
        return ResolvedModel(sizes=model_size(hparams), hparams=hparams,
                             origin=FROM_SCRATCH, path=None, sizes_from=name,
                             vocab_dir=vocab_dir,
                             source=f"random initialisation ({name})",
                             with_memory=config_with_memory(name))
    elif not pretrain_checkpoint and _holds_hf_model(pretrain_model_dir):
        resolved = _resolve_hf(pretrain_model_dir, hub_name)
    else:
        prefix = pretrain_checkpoint or os.path.join(pretrain_model_dir, DEFAULT_PREFIX)
        resolved = _resolve_openai(prefix, download)
    if config:
        check_sizes_agree(config, resolved.sizes, config_model, resolved.sizes_from)
        _apply_config_memory(resolved, config_with_memory(config_model), config_model)
    return resolved


def _apply_config_memory(resolved: ResolvedModel, wanted: bool, config_name: str) -> None:
    """A config's memory = True: fresh cross-attention on OpenAI's weights; a
    checkpoint keeps what it was trained with and must agree."""
    if not wanted:
        return  # not asked for: OpenAI's weights alone, or the checkpoint's own
    if resolved.origin == FROM_CHECKPOINT and not resolved.with_memory:
        raise UserError(f"{config_name} sets memory = True but {resolved.path} has no "
                        f"cross-attention: leave out --config_model, or start from "
                        f"OpenAI's weights with that config")
    resolved.with_memory = True


def _resolve_checkpoint(path: str, vocab_dir: Optional[str],
                        base_flags: Dict[str, Any]) -> ResolvedModel:
    state = load_checkpoint(path)
    hparams = hparams_from_checkpoint(state, path)
    if lora.is_adapter_checkpoint(state):
        return _resolve_adapter_checkpoint(path, state, hparams, base_flags)
    model_state = state.pop("model")
    return ResolvedModel(sizes=model_size(hparams), hparams=hparams,
                         origin=FROM_CHECKPOINT, path=path, sizes_from=path,
                         vocab_dir=vocab_dir, source=f"fine-tuned checkpoint {path}",
                         model_state=model_state,
                         training_state=state if "optimizer" in state else None,
                         with_memory=checkpoint_with_memory(state, path))


def _resolve_adapter_checkpoint(path: str, state: Dict[str, Any], hparams: Dict[str, Any],
                                base_flags: Dict[str, Any]) -> ResolvedModel:
    """The base model an adapter checkpoint names (or the one the weight
    flags give), carrying the adapters and the checkpoint's training state."""
    settings, tensors, base = lora.read_adapter_checkpoint(state, path)
    flags = {key: value for key, value in base_flags.items() if value is not None}
    if "lora_base" in flags:
        resolved = resolve_base(_base_of_path(flags["lora_base"]), path)
    elif "pretrain_model_dir" in flags or "pretrain_checkpoint" in flags:
        resolved = resolve_model(**flags)
    else:
        resolved = resolve_base(base, path, download=base_flags.get("download", True))
    if resolved.sizes != model_size(hparams):
        raise UserError(f"the base model {resolved.describe()} does not have the sizes of "
                        f"{describe_sizes(model_size(hparams), path)}: give the base "
                        f"model its adapters were trained on")
    resolved.adapters = Adapters(settings, tensors, base, path, resolved.source)
    resolved.training_state = state if "optimizer" in state else None
    resolved.source = f"{resolved.source} with the LoRA adapters of {path}"
    return resolved


def _base_of_path(where: str) -> Dict[str, Any]:
    """A lora_base record for a base model given by path, its kind told by its files."""
    if hf_hub.is_hub_name(where) or (os.path.isdir(where) and _holds_hf_model(where)):
        return {"kind": "huggingface", "path": where}
    if os.path.isdir(where):
        return {"kind": "openai", "path": os.path.join(where, DEFAULT_PREFIX)}
    return {"kind": "checkpoint", "path": where}


def resolve_base(base: Dict[str, Any], path: str, download: bool = True) -> ResolvedModel:
    """The base model an adapter checkpoint's lora_base names (kind, path)."""
    where = base["path"]
    local = not hf_hub.is_hub_name(where)
    if local and not os.path.exists(where if base["kind"] != "openai" else
                                    os.path.dirname(where)):
        raise UserError(f"{path} holds LoRA adapters for the base model {where}, which "
                        f"is not there: give it with --pretrain_model_dir (or "
                        f"--pretrain_checkpoint; convert_checkpoint.py: --lora_base)")
    if base["kind"] == "checkpoint":
        if lora.is_adapter_checkpoint(load_checkpoint(where)):
            raise UserError(f"{path} names {where} as its base, which holds adapters "
                            f"itself: merge that one first (convert_checkpoint.py "
                            f"--merge_lora ... --format ckpt)")
        resolved = resolve_model(checkpoint=where)
        resolved.training_state = None  # only its weights are the base
        return resolved
    if base["kind"] == "openai":
        return resolve_model(pretrain_checkpoint=where, download=download)
    return resolve_model(pretrain_model_dir=where, download=download)


def _holds_hf_model(model_dir: str) -> bool:
    """Whether --pretrain_model_dir is a Hugging Face GPT-2 directory, told by
    its files. A missing directory, or a released model's folder without
    config.json, is OpenAI's (its files are downloaded); any other directory
    holding neither format is refused, naming what it holds."""
    if not os.path.isdir(model_dir):
        return False
    if not os.path.exists(os.path.join(model_dir, CONFIG)) and \
            model_name_of_dir(model_dir, prefix_optional=True) is not None:
        return False
    return detect_format(model_dir) == "hf"


def _resolve_hf(model_dir: str, hub_name: Optional[str]) -> ResolvedModel:
    """Only config.json is read to learn the sizes."""
    config_path = os.path.join(model_dir, CONFIG)
    sizes = read_hf_config(config_path)
    return ResolvedModel(sizes=sizes, hparams=hparams_from_sizes(sizes), origin=FROM_HF,
                         path=model_dir, sizes_from=config_path, vocab_dir=model_dir,
                         source=f"Hugging Face model {hub_name or model_dir}",
                         hub_name=hub_name)


def _resolve_openai(prefix: str, download: bool) -> ResolvedModel:
    """Only hparams.json is fetched (when missing) to learn the sizes."""
    if prefix.endswith(".index"):
        prefix = prefix[:-len(".index")]
    model_dir = os.path.dirname(prefix) or "."
    ensure_openai_files(prefix, download, [HPARAMS_FILE])
    hparams_path = os.path.join(model_dir, HPARAMS_FILE)
    hparams = hparams_from_openai(openai_weights.read_openai_hparams(model_dir),
                                  hparams_path)
    return ResolvedModel(sizes=model_size(hparams, hparams_path), hparams=hparams,
                         origin=FROM_OPENAI, path=prefix, sizes_from=hparams_path,
                         vocab_dir=model_dir, source=f"OpenAI checkpoint {prefix}",
                         download=download)


def ensure_openai_files(prefix: str, download: bool,
                         files: Optional[List[str]] = None) -> None:
    """Make OpenAI's files usable in a folder named after a released model:
    download those missing or failing their content check (a file cut short or
    an HTML error page saved by an earlier tool is fetched again, not trusted).
    `files` limits the check and the download to those names (hparams.json
    alone tells the sizes before gigabytes of weights)."""
    model_dir = os.path.dirname(prefix) or "."
    name = model_name_of_dir(model_dir, prefix_optional=True)
    if download and name is not None and os.path.basename(prefix) == DEFAULT_PREFIX:
        needed = files or [HPARAMS_FILE, INDEX_FILE, DATA_FILE]
        if file_problems(model_dir, needed):
            download_model(name, model_dir, files=files or MODEL_FILES)
        return
    wanted = ([os.path.join(model_dir, f) for f in files] if files is not None
              else [prefix + ".index", os.path.join(model_dir, HPARAMS_FILE)])
    if not all(os.path.isfile(path) for path in wanted):
        raise UserError(
            f"no GPT-2 checkpoint at {prefix} (model.ckpt.index and hparams.json "
            f"expected in {model_dir}): download one with "
            f"'sh download_model.sh 117M' (or 345M, 774M, 1558M), or point "
            f"--pretrain_model_dir/--pretrain_checkpoint at OpenAI's files")


def _check_weight_paths(pretrain_model_dir: Optional[str],
                        pretrain_checkpoint: Optional[str]) -> None:
    """One clear line for a weight flag that names the wrong kind of path
    (load_checkpoint does the same for --checkpoint)."""
    if pretrain_model_dir and os.path.exists(pretrain_model_dir) \
            and not os.path.isdir(pretrain_model_dir):
        raise UserError(
            f"--pretrain_model_dir {pretrain_model_dir} is a file, not a directory: "
            f"pass the directory holding hparams.json and model.ckpt.* (a checkpoint "
            f"file goes to --checkpoint, an OpenAI checkpoint prefix to "
            f"--pretrain_checkpoint)")
    if pretrain_checkpoint and os.path.isdir(pretrain_checkpoint):
        raise UserError(
            f"--pretrain_checkpoint {pretrain_checkpoint} is a directory: pass the "
            f"checkpoint prefix inside it, e.g. "
            f"{os.path.join(pretrain_checkpoint, DEFAULT_PREFIX)}, or use "
            f"--pretrain_model_dir {pretrain_checkpoint}")


# ---------------------------------------------------------------------------
# Step 2: build the model and fill its weights

def load_weights(resolved: ResolvedModel, target: Optional[LoadTarget] = None,
                 apply_adapters: bool = True) -> LoadedModel:
    """Build the resolved model and fill its weights (downloading OpenAI's
    files when missing): once memory allows it and the tokenizer's ids fit;
    every weight loaded must be finite. The model is on CPU in eval mode.

    Weights from files are streamed one tensor at a time into a model built
    on the meta device, through `target` (utils/checkpoints/streaming.py;
    CPUTarget when None): the weights are never held twice. A model that
    needs a random start (from scratch, or memory mode's fresh
    cross-attention) is built initialised on the CPU and `target` is not used.
    An adapter checkpoint's adapters are checked against the base and merged
    into it, unless not `apply_adapters` (a trainer that resumes them); its
    base is loaded in float (a caller does not pass an int8 target for it).
    """
    sizes, source = resolved.sizes, resolved.source
    # Before downloading gigabytes of weights that could not be used.
    _require_build_memory(sizes, source)
    if resolved.origin == FROM_OPENAI:
        ensure_openai_files(resolved.path, resolved.download)
    elif resolved.origin == FROM_HF and resolved.hub_name:
        hf_hub.fetch_hub_model(resolved.hub_name, weights=True,
                               revision=hf_hub.snapshot_revision(resolved.path))
    _check_vocabulary(sizes["n_vocab"], resolved.vocab_dir, source)
    if resolved.origin == FROM_CHECKPOINT:  # names and shapes; values as they stream
        check_checkpoint_names(resolved.model_state, sizes, resolved.with_memory,
                               resolved.path)
    # Memory mode's cross-attention is not in OpenAI's or Hugging Face's files:
    # it keeps texar's random start.
    fresh_memory = resolved.with_memory and resolved.origin in (FROM_OPENAI, FROM_HF)
    if resolved.origin == FROM_SCRATCH or fresh_memory:
        model, target = build_model(resolved.hparams, resolved.with_memory), LoadTarget()
    else:
        target = target or CPUTarget()
        model = build_meta_model(resolved.hparams, resolved.with_memory)
        target.place(model)
    if resolved.origin == FROM_OPENAI:
        openai_weights.load_openai_weights(
            model, resolved.path,
            ParameterFiller(model, target, source, fresh_memory=True))
    elif resolved.origin == FROM_CHECKPOINT:
        _stream_checkpoint(model, target, resolved)
    elif resolved.origin == FROM_HF:
        _stream_hf(model, target, resolved, fresh_memory)
    if resolved.adapters is not None:
        _check_adapters_fit(model, resolved)
        if apply_adapters:
            _merge_adapters(model, resolved.adapters)
            for name, param in model.named_parameters():  # the merged weights
                check_finite(name, param.detach(), source)
    model.eval()
    return LoadedModel(model=model, hparams=resolved.hparams,
                       vocab_dir=resolved.vocab_dir, source=source,
                       with_memory=resolved.with_memory)


def _check_adapters_fit(model: nn.Module, resolved: ResolvedModel) -> None:
    adapters = resolved.adapters
    lora.check_fingerprint(model, adapters.settings.targets, adapters.base.get("fingerprint"),
                           adapters.base_source, adapters.path)


def _merge_adapters(model: nn.Module, adapters: Adapters) -> None:
    lora.add_adapters(model, adapters.settings)
    lora.load_adapter_state(model, adapters.tensors, adapters.path)
    lora.merge_adapters(model)
    model.requires_grad_(True)  # add_adapters froze the base


def _stream_checkpoint(model: nn.Module, target: LoadTarget, resolved: ResolvedModel) -> None:
    """Our checkpoint's tensors (mapped by load_checkpoint) into the model,
    each one's file pages given back once it is in."""
    filler = ParameterFiller(model, target, checkpoint_source(resolved.path))
    state, resolved.model_state = resolved.model_state, None  # the model holds them now
    for name in list(state):  # in the model's order: the embedding before its tie
        tensor = state.pop(name)
        filler.put(name, tensor)
        release_pages(tensor)
    filler.finish()


def _stream_hf(model: nn.Module, target: LoadTarget, resolved: ResolvedModel,
               fresh_memory: bool) -> None:
    """A Hugging Face directory's tensors into the model, one at a time
    (iter_hf_tensors has checked each)."""
    filler = ParameterFiller(model, target, resolved.path, fresh_memory=fresh_memory)
    n_layer = resolved.sizes["n_layer"]
    for hf_name, tensor in iter_hf_tensors(resolved.path, resolved.sizes):
        for name, piece in texar_of_hf_tensor(hf_name, tensor, n_layer):
            filler.put(name, piece, checked=True)
    filler.finish()


def _check_vocabulary(n_vocab: int, vocab_dir: Optional[str], source: str) -> None:
    """The GPT-2 tokenizer's ids must all exist in the model's embedding."""
    tokens = len(get_encoder(vocab_dir))
    if n_vocab < tokens:
        raise UserError(f"{source} has n_vocab={n_vocab} but the GPT-2 tokenizer "
                        f"has {tokens} tokens: its ids would fall outside the model; "
                        f"use a model with n_vocab >= {tokens}")


def _require_build_memory(sizes: Dict[str, int], source: str) -> None:
    """Refuse, with the estimate, a model too large for this machine's RAM."""
    require_memory(build_peak_bytes(sizes),
                   f"building the model of {describe_sizes(sizes, source)}",
                   "use a smaller model, or a machine with more memory")
