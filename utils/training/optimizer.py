"""The optimizer a training config's `opt` describes (texar optimization hparams).

texar builds the optimizer and the gradient clipping; here they get weight
decay on matrices only, torch's fused Adam/AdamW kernel where it exists, and
the loss scaler fp16 needs; a sharded model's Adafactor steps through
ShardedAdafactor (utils/training/sharded_adafactor.py).
"""
from typing import Any, Dict, List

import torch

from utils.model import import_texar
from utils.training.sharded_adafactor import ShardedAdafactor


def opt_hparams(opt: Dict[str, Any]):
    """texar's HParams for `opt`, with its defaults filled in."""
    tx = import_texar()
    return tx.HParams(opt, tx.core.default_optimization_hparams())


def build_optimizer(model: torch.nn.Module, opt: Dict[str, Any], precision: str,
                    device: torch.device, sharded: bool = False):
    """(optimizer, gradient clipping function or None, fp16 loss scaler or None)
    for `model`, as the training config's `opt` and `precision` say. `sharded`
    (the model's weights are FSDP shards, DTensors): torch's default kernels,
    and Adafactor as ShardedAdafactor, which steps whole tensors."""
    tx = import_texar()
    hparams = opt_hparams(opt)
    if sharded:
        optimizer = tx.core.get_optimizer(_param_groups(model), hparams)
        if type(optimizer) is torch.optim.Adafactor:
            optimizer = ShardedAdafactor(optimizer.param_groups, **optimizer.defaults)
    else:
        optimizer = _make_optimizer(tx, _param_groups(model), hparams, device)
    scaler = _grad_scaler() if precision == "fp16" else None
    return optimizer, tx.core.get_grad_clip_fn(hparams), scaler


def optimizer_type(optimizer) -> str:
    """The optimizer's name in checkpoints: ShardedAdafactor keeps torch's
    Adafactor state layout, so it is saved as "Adafactor" and its checkpoints
    resume sharded or not."""
    if isinstance(optimizer, ShardedAdafactor):
        return torch.optim.Adafactor.__name__
    return type(optimizer).__name__


def _param_groups(model) -> List[Dict[str, Any]]:
    """Weight decay on matrices only, not on biases and LayerNorm gains (as GPT-2
    fine-tuning usually does); the optimizer kwargs' weight_decay applies to the
    first group."""
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters appear once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(tx, groups, hparams, device):
    """texar's get_optimizer; Adam/AdamW use torch's fused kernel when the
    config leaves the implementation open and this torch has it for the
    device (one kernel over all parameters instead of several per tensor).
    The arithmetic is the same AdamW."""
    opt = hparams.optimizer
    kwargs = opt.kwargs.todict()
    if (opt.type in ("Adam", "AdamW", "torch.optim.Adam", "torch.optim.AdamW")
            and not {"fused", "foreach"} & set(kwargs)):
        fused = hparams.todict()
        fused["optimizer"]["kwargs"]["fused"] = True
        try:
            probe = torch.zeros(1, device=device, requires_grad=True)
            getattr(torch.optim, opt.type.split(".")[-1])([probe], lr=1.0, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch or an unsupported device: torch's default
        else:
            return tx.core.get_optimizer(groups, fused)
    return tx.core.get_optimizer(groups, hparams)


def _grad_scaler():
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()
