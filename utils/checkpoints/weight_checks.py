"""The checks every GPT-2 weight passes, whichever command reads it.

gpt2_generate_main.py, gpt2_train_main.py and convert_checkpoint.py read
weights from our .ckpt, Hugging Face safetensors/.bin and OpenAI's TF
checkpoints; each of those readers calls these functions, so what one
command refuses no other accepts:
- `check_dtype`: a weight is float32, float16 or bfloat16. An int8, int64 or
  bool tensor is not a GPT-2 weight (a quantized or damaged file); casting it
  to float would run a model of nonsense, so it is refused, naming the tensor.
- `check_tensor`: the dtype, and every value finite (a NaN makes every output NaN).
- `check_checkpoint_names` / `check_checkpoint_weights`: our .ckpt's "model" dict holds exactly the
  tensors its model_sizes describe (names and shapes), no more, no fewer, and
  cross-attention only when it says with_memory; each passes `check_tensor`.
"""
from typing import Dict, List, Mapping, Tuple, Union

import numpy as np
import torch

from utils.errors import UserError
from utils.checkpoints.hf_names import hf_tensor_shapes, texar_of_hf_tensor, tie_output_layer
from utils.model import is_memory_parameter

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def name_lists(labelled: tuple, limit: int = 8) -> List[str]:
    """'label: a, b and 3 more' for each non-empty list of names."""
    phrases = []
    for label, names in labelled:
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            phrases.append(f"{label}: {', '.join(names[:limit])}{more}")
    return phrases


def dtype_name(dtype: Union[torch.dtype, np.dtype, str]) -> str:
    """"float32", "int8", ... for a torch or numpy dtype, or a name already."""
    return str(dtype).replace("torch.", "")


def check_dtype(name: str, dtype, where: str) -> None:
    """Refuse a weight whose dtype is not one of WEIGHT_DTYPES."""
    kind = dtype_name(dtype)
    if kind not in WEIGHT_DTYPES:
        raise UserError(f"{where}: tensor {name} is {kind}, but GPT-2's weights are "
                        f"{', '.join(WEIGHT_DTYPES)}: the file is quantized, damaged "
                        f"or not a GPT-2 model; use the model's floating-point weights")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or inf anywhere makes the sum
    NaN or inf, so a finite sum (one pass, no temporary) settles it; a
    non-finite one may be an overflow of large finite values, so the values
    are then checked one by one."""
    with torch.no_grad():
        if bool(torch.isfinite(tensor.sum())):
            return True
        return bool(torch.isfinite(tensor).all())


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if not all_finite(tensor):
        raise UserError(f"{where} has non-finite weights (NaN or inf), first in {name}: "
                        f"it cannot be used; load an earlier checkpoint saved before the "
                        f"loss went non-finite")


def check_tensor(name: str, tensor: torch.Tensor, where: str) -> None:
    """A weight's dtype, then its values."""
    check_dtype(name, tensor.dtype, where)
    check_finite(name, tensor, where)


def texar_weight_shapes(sizes: Mapping[str, int]) -> Dict[str, Tuple[int, ...]]:
    """texar GPT2Decoder state-dict name -> shape of a GPT-2 of `sizes` (without
    memory mode's cross-attention), computed without building the model."""
    shapes: Dict[str, torch.Tensor] = {}
    for hf_name, shape in hf_tensor_shapes(sizes).items():
        meta = torch.empty(shape, device="meta")
        shapes.update(texar_of_hf_tensor(hf_name, meta, sizes["n_layer"]))
    return {name: tuple(t.shape) for name, t in tie_output_layer(shapes).items()}


def weight_name_problems(state: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                         with_memory: bool) -> Dict[str, list]:
    """{"missing": [...], "unexpected": [...], "mis-shaped": [...]} of a texar
    state dict against the model of `sizes`; cross-attention tensors count as
    unexpected unless `with_memory` (their exact set is the model's business)."""
    expected = texar_weight_shapes(sizes)
    extra = sorted(n for n in state if n not in expected
                   and not (with_memory and is_memory_parameter(n)))
    return {"missing": sorted(set(expected) - set(state)),
            "unexpected": extra,
            "mis-shaped": sorted(f"{n} {list(state[n].shape)} (need {list(expected[n])})"
                                 for n in expected if n in state and
                                 tuple(state[n].shape) != expected[n])}


def check_checkpoint_names(state: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                           with_memory: bool, path: str) -> None:
    """Our .ckpt's model dict holds exactly the tensors its sizes need (names
    and shapes; no value is read); a UserError naming the file otherwise."""
    problems = weight_name_problems(state, sizes, with_memory)
    parts = name_lists(tuple(problems.items()))
    if parts:
        raise UserError(f"{path} does not fit the model sizes it declares "
                        f"(n_layer={sizes['n_layer']}, n_embd={sizes['n_embd']}): "
                        + "; ".join(parts))


def check_checkpoint_weights(state: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
                             with_memory: bool, path: str) -> None:
    """Our .ckpt's model dict: exactly the tensors its sizes need, each a finite
    float (see the module docstring); a UserError naming the file otherwise.
    A streamed load checks the names first and each tensor as it arrives
    (utils/checkpoints/streaming.py), with the same `check_tensor`."""
    check_checkpoint_names(state, sizes, with_memory, path)
    for name, tensor in state.items():
        check_tensor(name, tensor, checkpoint_source(path))


def checkpoint_source(path: str) -> str:
    """How messages name our checkpoint at `path`."""
    return f"fine-tuned checkpoint {path}"
