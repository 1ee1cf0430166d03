"""OpenAI's released GPT-2 TensorFlow checkpoints -> texar's GPT2Decoder.

OpenAI's files (`model.ckpt.*` beside `hparams.json`) are read by
`utils.checkpoints.tf_reader` without TensorFlow; this module maps each TF variable
onto texar's parameter names (`openai_to_texar_plan`), checks that every
variable and parameter is used exactly once with the right shape, and copies
the values (`load_openai_weights`).
"""
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from utils.errors import UserError
from utils.json_file import read_json
from utils.model import is_memory_parameter
from utils.checkpoints.openai_files import HPARAMS_FILE
from utils.checkpoints.streaming import LoadTarget, ParameterFiller
from utils.checkpoints.tf_reader import TFCheckpointReader
from utils.checkpoints.tf_reader import resolve_checkpoint_prefix
from utils.checkpoints.weight_checks import check_dtype, check_finite, name_lists

# Bookkeeping a TF training run may leave beside the weights; never model parameters.
_IGNORED_TF_SUFFIXES = ("/Adam", "/Adam_1")
_IGNORED_TF_NAMES = ("global_step", "beta1_power", "beta2_power")


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


def is_ignorable_tf_variable(name: str) -> bool:
    return name in _IGNORED_TF_NAMES or name.endswith(_IGNORED_TF_SUFFIXES)


def load_openai_weights(model: nn.Module, ckpt_prefix: str,
                        filler: Optional[ParameterFiller] = None) -> None:
    """Fill every parameter of `model` from an OpenAI GPT-2 TF checkpoint
    (all but memory mode's cross-attention, which OpenAI's models lack).

    Every OpenAI variable is used exactly once and every parameter assigned;
    otherwise one UserError lists the missing, unexpected and mis-shaped
    names. The output layer is tied to the token embedding, so it follows.
    Tensors are streamed one at a time into `filler` (by default copied into
    the model's parameters), each variable's file pages given back once it
    is in (utils/checkpoints/streaming.py).
    """

    prefix = resolve_checkpoint_prefix(ckpt_prefix)
    if filler is None:
        filler = ParameterFiller(model, LoadTarget(), f"checkpoint {prefix}",
                                 fresh_memory=True)
    # Memory mode's cross-attention has no OpenAI weights: it keeps its own start.
    params = {name: param for name, param in model.named_parameters()
              if not is_memory_parameter(name)}
    n_layer = len(model.decoder.self_attns)
    plan = openai_to_texar_plan(n_layer)
    with TFCheckpointReader(prefix) as reader:
        variables = {name: shape for name, (_, shape) in reader.variables().items()
                     if not is_ignorable_tf_variable(name)}
        for name in variables:
            check_dtype(name, reader.tf_dtype(name), prefix)
        problems = _mapping_problems(plan, variables, params)
        if problems:
            raise UserError(f"checkpoint {prefix} does not fit the model: "
                            + "; ".join(problems)
                            + " (check --config_model and hparams.json against "
                              "the checkpoint files)")
        for tf_name, targets in plan.items():
            array = reader.read(tf_name)
            # Checked once, as stored (contiguous), not part by part once transposed.
            check_finite(tf_name, torch.from_numpy(array), filler.where)
            for texar_name, kind, part in targets:
                filler.put(texar_name, torch.from_numpy(_convert(array, kind, part)),
                           checked=True)
            del array
            reader.release(tf_name)
    filler.finish()


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
    return name_lists((("missing from the checkpoint", missing_tf),
                        ("unexpected in the checkpoint", unexpected_tf),
                        ("model parameters never assigned", unassigned),
                        ("mis-shaped", misshaped)))


def read_openai_hparams(model_dir: str) -> Dict[str, Any]:
    """The dict in `model_dir/hparams.json`, with a clear error when unusable."""
    path = os.path.join(model_dir, HPARAMS_FILE)
    if not os.path.lexists(path):
        raise UserError(f"{path} not found: a GPT-2 model directory holds OpenAI's "
                        f"hparams.json beside model.ckpt.*")
    hparams = read_json(path, "model hparams", "re-download the model files")
    if not isinstance(hparams, dict):
        raise UserError(f"{path} must hold a JSON object with n_vocab, n_ctx, "
                        f"n_embd, n_head, n_layer")
    return hparams
