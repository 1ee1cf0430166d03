"""Weights streamed into a model one tensor at a time, never held twice.

Every reader (OpenAI's TF bundle, Hugging Face safetensors/.bin, our .ckpt)
hands (texar name, tensor) pairs to a `ParameterFiller`, which checks each
tensor (utils/checkpoints/weight_checks.py: dtype, finite values), its name
and shape against the model, and passes it to a `LoadTarget`, which puts it
where the run keeps it. The model is built on the meta device
(utils/model.build_meta_model); the target's `place` gives its parameters
storage first. The default target, `CPUTarget`, is plain CPU memory; the
decoding engine has targets that lay the weights out for decoding or
quantize them to int8 as they arrive (utils/decoding/load_targets.py).

So a load's peak is the model plus one tensor, and a large tensor is copied
in blocks of CHUNK_BYTES: the pages of the file a block came from are given
back once it has been copied (utils/checkpoints/pages.py), and nothing
builds a whole state dict.
"""
from typing import Dict, Set

import torch
from torch import nn

from utils.errors import UserError
from utils.model import cpu_tensor_like, is_memory_parameter, place_parameters
from utils.checkpoints.pages import release_pages
from utils.checkpoints.weight_checks import check_tensor, name_lists

# A tensor larger than this streams in blocks of rows, so that a load holds
# at most this much of the file beside the model (the 124M model's token
# embedding alone is 147 MiB).
CHUNK_BYTES = 16 << 20


class LoadTarget:
    """Where loaded weights go. `place` gives a meta-built model's parameters
    storage; `fill` writes one tensor into its parameter (a copy, cast to the
    parameter's dtype); `finish` runs once every weight is in."""

    def place(self, model: nn.Module) -> None:
        raise NotImplementedError

    def fill(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(value)

    def fills_rows(self, param: nn.Parameter) -> bool:
        """Whether `fill` may be given `param` a block of rows at a time (a
        copy may; a target that transforms the whole tensor may not)."""
        return True

    def finish(self, model: nn.Module) -> None:
        pass


class CPUTarget(LoadTarget):
    """Plain CPU memory, the model's own dtype."""

    def place(self, model: nn.Module) -> None:
        place_parameters(model, lambda name, param: cpu_tensor_like(param))


class ParameterFiller:
    """Takes a model's weights one (texar name, tensor) at a time.

    Every parameter (but memory mode's cross-attention when `fresh_memory`:
    OpenAI's and Hugging Face's files lack it) must be given exactly once,
    with its shape; the tied output layer may be given too (it is the token
    embedding, filled once). `finish` names what is missing.
    """

    def __init__(self, model: nn.Module, target: LoadTarget, where: str,
                 fresh_memory: bool = False):
        self.model, self.target, self.where = model, target, where
        self.params: Dict[str, nn.Parameter] = {
            name: param for name, param in model.named_parameters(remove_duplicate=False)
            if not (fresh_memory and is_memory_parameter(name))}
        self.filled: Set[int] = set()
        self.names_given: Set[str] = set()

    def put(self, name: str, value: torch.Tensor, checked: bool = False) -> None:
        """One tensor in; `checked`: the reader has already passed it through
        check_tensor (its values are not read twice)."""
        param = self.params.get(name)
        if param is None:
            raise UserError(f"{self.where} does not fit the model sizes it declares: "
                            f"unexpected: {name}")
        if name in self.names_given:
            raise UserError(f"{self.where}: tensor {name} is given twice; the file is "
                            f"damaged")
        if tuple(value.shape) != tuple(param.shape):
            raise UserError(f"{self.where} does not fit the model sizes it declares: "
                            f"mis-shaped: {name} {list(value.shape)} "
                            f"(need {list(param.shape)})")
        self.names_given.add(name)
        if id(param) in self.filled:  # the tied output layer: the embedding again
            return
        rows = (self._rows_per_chunk(value) if self.target.fills_rows(param)
                and value.is_contiguous() and value.dim() else None)
        if rows is None:  # whole
            if not checked:
                check_tensor(name, value, self.where)
            self.target.fill(name, param, value)
        else:  # a large tensor in blocks of rows, each block's file pages given back
            for start in range(0, value.size(0), rows):
                part = value[start:start + rows]
                if not checked:
                    check_tensor(name, part, self.where)
                self.target.fill(name, param[start:start + rows], part)
                release_pages(part)
        self.filled.add(id(param))

    @staticmethod
    def _rows_per_chunk(value: torch.Tensor):
        row_bytes = value[0].numel() * value.element_size() if value.size(0) else 0
        if not row_bytes or value.size(0) * row_bytes <= CHUNK_BYTES:
            return None
        return max(1, CHUNK_BYTES // row_bytes)

    def finish(self) -> None:
        missing = sorted(name for name, param in self.params.items()
                         if id(param) not in self.filled)
        if missing:
            raise UserError(f"{self.where} does not fit the model sizes it declares: "
                            + "; ".join(name_lists((("missing", missing),))))
        self.target.finish(self.model)
