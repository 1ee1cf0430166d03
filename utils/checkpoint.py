"""Load GPT-2 weights into texar's GPT2Decoder, and save/load our own checkpoints.

Two kinds of checkpoint:
- OpenAI's released TensorFlow checkpoints (`model.ckpt.*` beside `hparams.json`),
  read by `utils.tf_checkpoint` without TensorFlow and mapped here onto texar's
  parameter names (`load_openai_weights`).
- Checkpoints written by `gpt2_train_main.py`: a `torch.save`d dict of data
  only: "model" (the state dict), "model_sizes" (GPT-2's five size numbers as
  ints), "model_dropout" (three floats), and training state (tensors, numbers,
  strings). They load with `weights_only=True`: nothing is unpickled.

A checkpoint never chooses code. texar builds whatever class an hparams "type"
names, so hparams are always rebuilt by `utils.model.gpt2_hparams` from the
checked sizes; older checkpoints that stored texar's "model_hparams" dict are
read for their five sizes and dropout rates only, and the dict goes no further.

`load_model` applies the scripts' flag precedence: --checkpoint, then
--from_scratch, then the pre-trained checkpoint (downloaded when missing).
"""
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.memory import require_memory
from utils.model import (build_model, build_peak_bytes, check_dropout, check_sizes,
                         check_sizes_agree, hparams_from_openai, hparams_from_sizes,
                         load_model_hparams, model_dropout, model_size)

DEFAULT_CONFIG_MODEL = "configs.config_model_117M"
DEFAULT_MODEL_NAME = "117M"
# Bookkeeping a TF training run may leave beside the weights; never model parameters.
_IGNORED_TF_SUFFIXES = ("/Adam", "/Adam_1")
_IGNORED_TF_NAMES = ("global_step", "beta1_power", "beta2_power")


# ---------------------------------------------------------------------------
# OpenAI TensorFlow checkpoints -> texar GPT2Decoder

def openai_to_texar_plan(n_layer: int) -> Dict[str, List[tuple]]:
    """For each OpenAI variable: the texar parameters it fills and how.

    Each target is (texar_name, kind, part): kind "copy" copies as is,
    "linear" squeezes TF's [1, in, out] conv weight and transposes it to
    torch's [out, in]; `part` (0, 1, 2) picks the q, k or v third of the fused
    c_attn projection (its last axis), or None for the whole tensor.
    """
    plan = {
        "model/wte": [("word_embedder._embedding", "copy", None)],
        "model/wpe": [("position_embedder._embedding", "copy", None)],
        "model/ln_f/g": [("decoder.final_layer_norm.weight", "copy", None)],
        "model/ln_f/b": [("decoder.final_layer_norm.bias", "copy", None)],
    }
    for i in range(n_layer):
        tf, tx = f"model/h{i}/", "decoder."
        attn = f"{tx}self_attns.{i}."
        ffn = f"{tx}poswise_networks.{i}._layers."
        plan.update({
            tf + "ln_1/g": [(f"{tx}self_attn_layer_norm.{i}.weight", "copy", None)],
            tf + "ln_1/b": [(f"{tx}self_attn_layer_norm.{i}.bias", "copy", None)],
            tf + "attn/c_attn/w": [(attn + f"{p}_dense.weight", "linear", j)
                                   for j, p in enumerate("QKV")],
            tf + "attn/c_attn/b": [(attn + f"{p}_dense.bias", "copy", j)
                                   for j, p in enumerate("QKV")],
            tf + "attn/c_proj/w": [(attn + "O_dense.weight", "linear", None)],
            tf + "attn/c_proj/b": [(attn + "O_dense.bias", "copy", None)],
            tf + "ln_2/g": [(f"{tx}poswise_layer_norm.{i}.weight", "copy", None)],
            tf + "ln_2/b": [(f"{tx}poswise_layer_norm.{i}.bias", "copy", None)],
            tf + "mlp/c_fc/w": [(ffn + "0.weight", "linear", None)],
            tf + "mlp/c_fc/b": [(ffn + "0.bias", "copy", None)],
            tf + "mlp/c_proj/w": [(ffn + "2.weight", "linear", None)],
            tf + "mlp/c_proj/b": [(ffn + "2.bias", "copy", None)],
        })
    return plan


def _converted_shape(shape: tuple, kind: str, part: Optional[int]) -> Optional[tuple]:
    """The shape a TF tensor takes once converted for one texar parameter.

    None when it cannot be converted at all (wrong rank, not divisible by 3).
    """
    if part is not None and shape and shape[-1] % 3:
        return None
    if kind == "linear":
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            return None
        rows, cols = shape
        return (cols // 3 if part is not None else cols, rows)
    if part is not None:
        return shape[:-1] + (shape[-1] // 3,)
    return shape


def _convert(array: np.ndarray, kind: str, part: Optional[int]) -> np.ndarray:
    if kind == "linear":
        array = array.reshape(array.shape[-2], array.shape[-1])
    if part is not None:
        width = array.shape[-1] // 3
        array = array[..., part * width:(part + 1) * width]
    if kind == "linear":
        array = array.T
    return array


def _is_ignorable_tf_variable(name: str) -> bool:
    return name in _IGNORED_TF_NAMES or name.endswith(_IGNORED_TF_SUFFIXES)


def load_openai_weights(model: nn.Module, ckpt_prefix: str) -> None:
    """Fill every parameter of `model` from an OpenAI GPT-2 TF checkpoint.

    Every OpenAI variable is used exactly once and every parameter assigned;
    otherwise one UserError lists the missing, unexpected and mis-shaped
    names. The output layer is tied to the token embedding, so it follows.
    """
    from utils.tf_checkpoint import TFCheckpointReader, resolve_checkpoint_prefix

    prefix = resolve_checkpoint_prefix(ckpt_prefix)
    params = dict(model.named_parameters())
    n_layer = len(model.decoder.self_attns)
    plan = openai_to_texar_plan(n_layer)
    with TFCheckpointReader(prefix) as reader:
        variables = {name: shape for name, (_, shape) in reader.variables().items()
                     if not _is_ignorable_tf_variable(name)}
        problems = _mapping_problems(plan, variables, params)
        if problems:
            raise UserError(f"checkpoint {prefix} does not fit the model: "
                            + "; ".join(problems)
                            + " (check --config_model and hparams.json against "
                              "the checkpoint files)")
        with torch.no_grad():
            for tf_name, targets in plan.items():
                array = reader.read(tf_name)
                for texar_name, kind, part in targets:
                    value = torch.from_numpy(
                        np.ascontiguousarray(_convert(array, kind, part)))
                    params[texar_name].copy_(value)
                del array


def _mapping_problems(plan: Dict[str, List[tuple]], variables: Dict[str, tuple],
                      params: Dict[str, torch.Tensor]) -> List[str]:
    """Names missing on either side, and shapes that disagree, as short phrases."""
    missing_tf = sorted(set(plan) - set(variables))
    unexpected_tf = sorted(set(variables) - set(plan))
    targets = {t[0] for ts in plan.values() for t in ts}
    unassigned = sorted(set(params) - targets)
    misshaped = []
    for tf_name, tf_targets in plan.items():
        if tf_name not in variables:
            continue
        for texar_name, kind, part in tf_targets:
            if texar_name not in params:
                unassigned.append(texar_name)
                continue
            want = tuple(params[texar_name].shape)
            got = _converted_shape(tuple(variables[tf_name]), kind, part)
            if got != want:
                misshaped.append(f"{tf_name} {list(variables[tf_name])} "
                                 f"for {texar_name} {list(want)}")
    return _name_lists((("missing from the checkpoint", missing_tf),
                        ("unexpected in the checkpoint", unexpected_tf),
                        ("model parameters never assigned", unassigned),
                        ("mis-shaped", misshaped)))


def _name_lists(labelled: tuple, limit: int = 8) -> List[str]:
    """'label: a, b and 3 more' for each non-empty list of names."""
    phrases = []
    for label, names in labelled:
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            phrases.append(f"{label}: {', '.join(names[:limit])}{more}")
    return phrases


def read_openai_hparams(model_dir: str) -> Dict[str, Any]:
    """The dict in `model_dir/hparams.json`, with a clear error when unusable."""
    path = os.path.join(model_dir, "hparams.json")
    try:
        with open(path, encoding="utf-8") as f:
            hparams = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: a GPT-2 model directory holds OpenAI's "
                        f"hparams.json beside model.ckpt.*") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-download the "
                        f"model files") from None
    if not isinstance(hparams, dict):
        raise UserError(f"{path} must hold a JSON object with n_vocab, n_ctx, "
                        f"n_embd, n_head, n_layer")
    return hparams


# ---------------------------------------------------------------------------
# Our own checkpoints (written by gpt2_train_main.py)

def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """torch.save `state` to `path` atomically: a crash leaves the old file whole."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _checkpoint_is_directory(path: str) -> UserError:
    inside = [name for name in ("model.ckpt", "model_best.ckpt")
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or not ours
        raise UserError(f"cannot read checkpoint {path}: it is corrupt or not a "
                        f"checkpoint written by gpt2_train_main.py "
                        f"({type(err).__name__})") from None
    model_state = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model_state, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in model_state.items()):
        raise UserError(f"{path} is not a checkpoint written by gpt2_train_main.py "
                        f"(it has no 'model' dict of named tensors)")
    return state


def checkpoint_model_fields(hparams: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint stores to rebuild its model: plain ints and floats."""
    return {"model_sizes": model_size(hparams),
            "model_dropout": model_dropout(hparams)}


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
# The scripts' entry point

@dataclass
class LoadedModel:
    model: nn.Module           # on CPU, in eval mode
    hparams: Dict[str, Any]    # the texar hparams it was built from
    vocab_dir: Optional[str]   # pass to utils.processor.get_encoder
    source: str                # where the weights came from, for messages


def default_pretrain_model_dir(config_model: Optional[str]) -> str:
    """The original example's directory for the model size a config describes."""
    from utils.download import default_model_dir
    if config_model:
        size = model_size(load_model_hparams(config_model))
        for name in ("117M", "345M", "774M", "1558M"):
            if model_size(load_model_hparams(f"configs.config_model_{name}")) == size:
                return default_model_dir(name)
    return default_model_dir(DEFAULT_MODEL_NAME)


def _ensure_pretrained_files(model_dir: str, prefix: str, download: bool,
                             files: Optional[List[str]] = None) -> None:
    """Download OpenAI's files into a default-named model dir when missing.

    `files` limits the check and the download to those names (hparams.json
    alone lets the caller check sizes before fetching gigabytes of weights).
    """
    from utils.download import MODEL_FILES, canonical_model_name, download_model
    wanted = [prefix + ".index", os.path.join(model_dir, "hparams.json")]
    if files is not None:
        wanted = [os.path.join(model_dir, f) for f in files]
    if all(os.path.isfile(path) for path in wanted):
        return
    name = os.path.basename(os.path.normpath(model_dir))
    name = name[len("model_"):] if name.startswith("model_") else name
    try:
        name = canonical_model_name(name)
    except UserError:
        name = None
    if not download or name is None or os.path.basename(prefix) != "model.ckpt":
        raise UserError(
            f"no GPT-2 checkpoint at {prefix} (model.ckpt.index and hparams.json "
            f"expected in {model_dir}): download one with "
            f"'sh download_model.sh 117M' (or 345M, 774M, 1558M), or point "
            f"--pretrain_model_dir/--pretrain_checkpoint at OpenAI's files")
    download_model(name, model_dir, files=files or MODEL_FILES)


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
            f"{os.path.join(pretrain_checkpoint, 'model.ckpt')}, or use "
            f"--pretrain_model_dir {pretrain_checkpoint}")


def _check_vocabulary(n_vocab: int, vocab_dir: Optional[str], source: str) -> None:
    """The GPT-2 tokenizer's ids must all exist in the model's embedding."""
    from utils.processor import get_encoder
    tokens = len(get_encoder(vocab_dir))
    if n_vocab < tokens:
        raise UserError(f"{source} has n_vocab={n_vocab} but the GPT-2 tokenizer "
                        f"has {tokens} tokens: its ids would fall outside the model; "
                        f"use a model with n_vocab >= {tokens}")


def _require_build_memory(sizes: Dict[str, int], source: str) -> None:
    """Refuse, with the estimate, a model too large for this machine's RAM."""
    require_memory(build_peak_bytes(sizes),
                   f"building the model of {source} (n_layer={sizes['n_layer']}, "
                   f"n_embd={sizes['n_embd']}, n_vocab={sizes['n_vocab']})",
                   "use a smaller model, or a machine with more memory")


def _build_checked(hparams: Dict[str, Any], vocab_dir: Optional[str],
                   source: str) -> nn.Module:
    """build_model, once the vocabulary fits and the machine's memory allows it."""
    sizes = model_size(hparams, source)
    _check_vocabulary(sizes["n_vocab"], vocab_dir, source)
    _require_build_memory(sizes, source)
    return build_model(hparams)


def _refuse_non_finite(model: nn.Module, source: str) -> None:
    """A NaN or inf weight makes every output NaN: refuse it at load time."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise UserError(f"{source} has non-finite weights (NaN or inf), first in "
                            f"{name}: it cannot be used; load an earlier checkpoint "
                            f"saved before the loss went non-finite")


def load_model(*, config_model: Optional[str] = None,
               pretrain_model_dir: Optional[str] = None,
               pretrain_checkpoint: Optional[str] = None,
               checkpoint: Optional[str] = None,
               from_scratch: bool = False,
               download: bool = True,
               check: Optional[Callable[[Dict[str, Any]], None]] = None,
               ) -> LoadedModel:
    """Build the GPT2Decoder the flags ask for and fill its weights.

    `check(hparams)` runs as soon as the model's size is known, before any
    weights are read or downloaded, so a flag that cannot fit fails fast.
    The model is built only once its sizes are checked, the tokenizer's ids
    fit it and memory allows it; its loaded weights must all be finite.
    """
    _check_weight_paths(pretrain_model_dir, pretrain_checkpoint)
    if pretrain_model_dir is None:
        pretrain_model_dir = (os.path.dirname(pretrain_checkpoint)
                              if pretrain_checkpoint
                              else default_pretrain_model_dir(config_model))
    vocab_dir = pretrain_model_dir if os.path.isdir(pretrain_model_dir) else None

    if checkpoint:
        state = load_checkpoint(checkpoint)
        hparams = hparams_from_checkpoint(state, checkpoint)
        if config_model:
            check_sizes_agree(load_model_hparams(config_model), model_size(hparams),
                              config_model, checkpoint)
        if check:
            check(hparams)
        source = f"fine-tuned checkpoint {checkpoint}"
        model = _build_checked(hparams, vocab_dir, source)
        _load_state_dict(model, state["model"], checkpoint)
    elif from_scratch:
        config_model = config_model or DEFAULT_CONFIG_MODEL
        hparams = load_model_hparams(config_model)
        if check:
            check(hparams)
        source = f"random initialisation ({config_model})"
        model = _build_checked(hparams, vocab_dir, source)
    else:
        prefix = pretrain_checkpoint or os.path.join(pretrain_model_dir, "model.ckpt")
        if prefix.endswith(".index"):
            prefix = prefix[:-len(".index")]
        model_dir = os.path.dirname(prefix) or "."
        _ensure_pretrained_files(model_dir, prefix, download, ["hparams.json"])
        hparams_path = os.path.join(model_dir, "hparams.json")
        hparams = hparams_from_openai(read_openai_hparams(model_dir), hparams_path)
        sizes = model_size(hparams, hparams_path)
        if config_model:
            check_sizes_agree(load_model_hparams(config_model), sizes,
                              config_model, hparams_path)
        if check:
            check(hparams)
        source = f"OpenAI checkpoint {prefix}"
        # Before downloading gigabytes of weights that could not be used.
        _require_build_memory(sizes, hparams_path)
        _ensure_pretrained_files(model_dir, prefix, download)
        vocab_dir = model_dir
        model = _build_checked(hparams, vocab_dir, source)
        load_openai_weights(model, prefix)
    _refuse_non_finite(model, source)
    model.eval()
    return LoadedModel(model=model, hparams=hparams, vocab_dir=vocab_dir,
                       source=source)


def _load_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                     path: str) -> None:
    """load_state_dict with one readable error instead of torch's traceback."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = sorted(k for k in set(own) & set(state_dict)
                       if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or misshaped:
        parts = _name_lists((("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)))
        raise UserError(f"{path} does not fit its own model_sizes: "
                        + "; ".join(parts))
    model.load_state_dict(state_dict)
