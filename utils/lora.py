"""LoRA: low-rank adapters on texar's linear layers, and what a checkpoint keeps of them.

An adapted layer y = W x + b becomes

    y = W x + b + (alpha / rank) * B (A dropout(x))

with A [rank, in] drawn as nn.Linear draws its weights (Kaiming uniform) and B
[out, rank] zero, so an adapted model starts out as its base. Only A and B
train; W and b stay frozen. The adapters are a child module `lora` of each
targeted nn.Linear, run by a forward hook: the base weights keep their names
(`decoder.self_attns.0.Q_dense.weight`), the adapters add
`decoder.self_attns.0.Q_dense.lora.A` / `.B`, and everything that calls the
layer (texar's forward, gradient checkpointing's recomputation, DDP) runs them.
Merging folds the update into W (W += (alpha / rank) * B A) and removes them.

Targets name groups of texar's GPT2Decoder layers: "attention" (the Q, K, V and
output projections of every block) and "mlp" (both feed-forward layers).

Why not Hugging Face's peft: it requires transformers and accelerate at run
time (transformers is an optional extra here), and wrapping a layer renames
its base weights (`base_layer.weight`), which every reader of our checkpoints
would have to undo. The arithmetic is the same as peft's LoRA, which
tests/test_lora.py checks by running peft on the same texar model.

An adapter checkpoint (`adapter_fields`) holds no "model": "lora" (the
settings), "lora_adapters" (name -> tensor) and "lora_base", the base model
it belongs to (where its weights came from, by kind and path, and a
fingerprint of the adapted weights that tells a different base apart). All
data: the kind is checked against a fixed list, never used to choose code.
"""
import contextlib
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch
from torch import nn

from utils.errors import UserError

TARGETS = ("attention", "mlp")
_ATTENTION_LAYERS = ("Q_dense", "K_dense", "V_dense", "O_dense")
_MLP_LAYERS = (0, 2)  # Linear, GELU, Linear in texar's FeedForwardNetwork._layers
ADAPTER_MARK = ".lora."  # in the state-dict name of every adapter tensor
# What a checkpoint's "lora_base" may name: our .ckpt, OpenAI's files, a
# Hugging Face directory (or hf:NAME).
BASE_KINDS = ("checkpoint", "openai", "huggingface")
_EXAMPLE = '{"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["attention", "mlp"]}'


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: Tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> Dict[str, Any]:
        """Plain values for a checkpoint (weights_only loads them)."""
        values = asdict(self)
        values["targets"] = list(self.targets)
        return values

    def describe(self) -> str:
        return (f"LoRA rank {self.rank}, alpha {self.alpha:g}, dropout {self.dropout:g} "
                f"on {' and '.join(self.targets)}")


def lora_settings(value: Any, where: str) -> LoraSettings:
    """The checked settings of a `lora` dict, or one UserError naming the fix."""
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be a dict like {_EXAMPLE}, or None")
    unknown = sorted(str(k) for k in value if k not in ("rank", "alpha", "dropout", "targets"))
    if unknown:
        raise UserError(f"{where} has unknown entries {', '.join(unknown)}: it takes "
                        f"rank, alpha, dropout and targets, e.g. {_EXAMPLE}")
    rank = value.get("rank", 8)
    alpha = value.get("alpha", 2 * rank if _is_int(rank) else 16)
    dropout = value.get("dropout", 0.0)
    targets = value.get("targets", list(TARGETS))
    if not _is_int(rank) or not 1 <= rank <= 4096:
        raise UserError(f"{where}: rank = {rank!r} must be an integer from 1 to 4096 "
                        f"(8 or 16 are usual)")
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise UserError(f"{where}: alpha = {alpha!r} must be a finite positive number "
                        f"(the update is scaled by alpha / rank)")
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise UserError(f"{where}: dropout = {dropout!r} must be a number in [0, 1)")
    if (isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets
            or not all(t in TARGETS for t in targets) or len(set(targets)) != len(targets)):
        raise UserError(f"{where}: targets = {targets!r} must be a list of distinct "
                        f"names from {', '.join(map(repr, TARGETS))}")
    return LoraSettings(rank, float(alpha), float(dropout),
                        tuple(t for t in TARGETS if t in targets))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------
# Adapters on a model

class LoraAdapter(nn.Module):
    """The low-rank update of one linear layer (run by its forward hook)."""

    def __init__(self, base: nn.Linear, settings: LoraSettings):
        super().__init__()
        weight = base.weight
        self.A = nn.Parameter(torch.empty(settings.rank, base.in_features,
                                          device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(base.out_features, settings.rank,
                                          device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear (and peft)
        self.dropout = nn.Dropout(settings.dropout)
        self.scale = settings.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.A.dtype)
        return (x @ self.A.t() @ self.B.t()) * self.scale

    def delta(self) -> torch.Tensor:
        """The update of the base weight [out, in]."""
        return (self.B @ self.A) * self.scale


def _add_update(layer: nn.Linear, inputs: Tuple[torch.Tensor, ...],
                output: torch.Tensor) -> torch.Tensor:
    return output + layer.lora(inputs[0]).to(output.dtype)


def target_layers(model: nn.Module, targets: Tuple[str, ...]) -> Iterator[Tuple[str, nn.Linear]]:
    """(name, layer) of each linear layer the targets name, in block order."""
    decoder = model.decoder
    for i in range(len(decoder.self_attns)):
        if "attention" in targets:
            for name in _ATTENTION_LAYERS:
                yield (f"decoder.self_attns.{i}.{name}",
                       getattr(decoder.self_attns[i], name))
        if "mlp" in targets:
            for index in _MLP_LAYERS:
                yield (f"decoder.poswise_networks.{i}._layers.{index}",
                       decoder.poswise_networks[i]._layers[index])


def add_adapters(model: nn.Module, settings: LoraSettings) -> None:
    """Give every targeted layer of the GPT2Decoder `model` a fresh adapter
    (the same draws for the same torch seed) and freeze everything else."""
    model.requires_grad_(False)
    for _, layer in target_layers(model, settings.targets):
        if hasattr(layer, "lora"):
            raise ValueError("the model already has LoRA adapters")
        layer.lora = LoraAdapter(layer, settings)
        layer._lora_hook = layer.register_forward_hook(_add_update)


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoraAdapter) for m in model.modules())


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters' tensors by state-dict name (copies, on the CPU)."""
    return {name: tensor.detach().cpu().clone()
            for name, tensor in model.state_dict().items() if ADAPTER_MARK in name}


def load_adapter_state(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                       source: str) -> None:
    """Fill the adapters added by add_adapters from `tensors`; a missing,
    unexpected or mis-shaped name is a UserError naming it."""
    own = {name: t for name, t in model.state_dict().items() if ADAPTER_MARK in name}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    misshaped = sorted(n for n in set(own) & set(tensors)
                       if tuple(own[n].shape) != tuple(tensors[n].shape))
    for problem, names in (("lacks", missing), ("has unexpected", unexpected),
                           ("has mis-shaped", misshaped)):
        if names:
            raise UserError(f"{source} {problem} adapter tensors ({len(names)}, e.g. "
                            f"{names[0]}): they do not fit its LoRA settings and model "
                            f"sizes; the file is damaged or not an adapter checkpoint")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight and remove it: the model is
    a plain GPT2Decoder again, whose outputs equal the adapted model's."""
    with torch.no_grad():
        for layer in list(model.modules()):
            adapter = getattr(layer, "lora", None)
            if not isinstance(adapter, LoraAdapter):
                continue
            layer.weight.add_(adapter.delta().to(layer.weight.dtype))
            layer._lora_hook.remove()
            del layer._lora_hook
            del layer.lora


@contextlib.contextmanager
def merged_view(model: nn.Module):
    """Inside: every adapted layer's weight is a merged copy and its hook is
    off, for code that reads weights rather than calling layers (the decoding
    engine). After: the base weights and adapters exactly as before. Costs
    one copy of the adapted weights while inside; a model without adapters
    is left alone."""
    swapped = []
    try:
        for layer in list(model.modules()):
            adapter = getattr(layer, "lora", None)
            if isinstance(adapter, LoraAdapter):
                base = layer.weight
                with torch.no_grad():
                    merged = base + adapter.delta().to(base.dtype)
                layer._lora_hook.remove()
                swapped.append((layer, base))
                del layer.weight
                layer.weight = nn.Parameter(merged, requires_grad=False)
        yield model
    finally:
        for layer, base in swapped:
            del layer.weight
            layer.weight = base
            layer._lora_hook = layer.register_forward_hook(_add_update)


def fingerprint(model: nn.Module, targets: Tuple[str, ...]) -> List[float]:
    """Two numbers that tell the base weights of the targeted layers apart:
    their sum and their sum of squares, in float64."""
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for _, layer in target_layers(model, targets):
            weight = layer.weight.detach().double()
            total += float(weight.sum())
            squares += float((weight * weight).sum())
    return [total, squares]


def check_fingerprint(model: nn.Module, targets: Tuple[str, ...], expected: Any,
                      base: str, source: str) -> None:
    """Refuse adapters on a base whose targeted weights are not those they
    were trained on (float32 rounding allowed)."""
    got = fingerprint(model, targets)
    if (not isinstance(expected, (list, tuple)) or len(expected) != 2
            or not all(_is_number(x) for x in expected)):
        raise UserError(f"{source}: lora_base fingerprint is damaged: the file cannot "
                        f"be used")
    for ours, theirs in zip(got, expected):
        if not math.isclose(ours, theirs, rel_tol=1e-5, abs_tol=1e-3):
            raise UserError(f"{source} holds adapters trained on other base weights than "
                            f"{base}: give the base model it was trained on "
                            f"(--pretrain_model_dir / --pretrain_checkpoint, or "
                            f"convert_checkpoint.py --lora_base)")


# ---------------------------------------------------------------------------
# Adapter checkpoints

def base_record(kind: str, path: str, model: nn.Module,
                settings: LoraSettings) -> Dict[str, Any]:
    """The "lora_base" of an adapter checkpoint: the base model's kind and
    path (absolute, or hf:NAME) and the fingerprint of its targeted weights."""
    if kind not in BASE_KINDS:
        raise ValueError(f"unknown base kind {kind!r}")
    where = path if path.startswith("hf:") else os.path.abspath(path)
    return {"kind": kind, "path": where, "fingerprint": fingerprint(model, settings.targets)}


def adapter_fields(model: nn.Module, settings: LoraSettings,
                   base: Dict[str, Any]) -> Dict[str, Any]:
    """What an adapter checkpoint stores in place of "model"."""
    return {"lora": settings.as_dict(), "lora_adapters": adapter_state(model),
            "lora_base": dict(base)}


def is_adapter_checkpoint(state: Mapping[str, Any]) -> bool:
    return "lora_adapters" in state


def read_adapter_checkpoint(state: Mapping[str, Any], path: str
                            ) -> Tuple[LoraSettings, Dict[str, torch.Tensor], Dict[str, Any]]:
    """(settings, adapter tensors, base record) of an adapter checkpoint,
    each checked; a damaged entry is a UserError."""
    settings = lora_settings(state.get("lora"), f"checkpoint {path}: lora")
    tensors = state.get("lora_adapters")
    if not isinstance(tensors, dict) or not tensors or not all(
            isinstance(k, str) and ADAPTER_MARK in k and torch.is_tensor(v)
            and v.is_floating_point() for k, v in tensors.items()):
        raise UserError(f"checkpoint {path}: lora_adapters must be named float tensors: "
                        f"the file is damaged")
    base = state.get("lora_base")
    if (not isinstance(base, dict) or base.get("kind") not in BASE_KINDS
            or not isinstance(base.get("path"), str) or not base["path"]):
        raise UserError(f"checkpoint {path}: lora_base must name the base model's kind "
                        f"({', '.join(BASE_KINDS)}) and path: the file is damaged")
    return settings, tensors, base
