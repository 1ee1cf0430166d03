"""Sharded data parallel (`shard_model = True` with --distributed): PyTorch FSDP.

Each of the W ranks keeps 1/W of every weight, gradient and optimizer state
(torch.distributed.fsdp.fully_shard, FSDP2: parameters become DTensors
sharded on their first dimension); Adafactor's small factored state is kept
whole on every rank instead (utils/training/sharded_adafactor.py). A transformer block's weights are
gathered just before the block runs, forward and backward (and again when
gradient checkpointing recomputes it), and freed after; gradients are
reduce-scattered, averaged over ranks as DDP averages them, so the trainer's
loss scaling is the same. One FSDP unit per transformer block (its attention,
feed-forward and two layer norms), and one at the root for the embeddings
(the output layer shares the token embedding) and the final layer norm.

Precision: on CUDA with precision = "bf16", FSDP's mixed-precision policy
gathers bf16 copies of the float32 shards for compute and reduces gradients
in float32 (the shards stay the float32 master weights). On CPU the weights
stay float32 and `precision` works through autocast as unsharded.

Checkpoints are the ordinary .ckpt of an unsharded run: "model" is the full
state dict, "optimizer" torch's usual layout (parameters numbered in
param_groups order, as optimizer.state_dict() numbers them). They are written
as they are gathered (utils/checkpoints/streamed_save.py): one tensor at a
time is gathered from the ranks, written by rank 0 and dropped, so rank 0
never holds more than its shards plus one full tensor (at most one block's
largest weight or optimizer moment). Any command reads them, and a run
resumes from them with any number of ranks, sharded or not: each rank loads
the full state and keeps its shard.
"""
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from utils.checkpoints.streamed_save import save_streamed
from utils.errors import UserError
from utils.model import build_meta_model, has_memory, place_parameters
from utils.training.sharded_adafactor import ShardedAdafactor

# FSDP2 warns whenever a unit returns a view, because an in-place op on it
# would skip a hook; texar's blocks only use their outputs out of place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def check_can_shard(ctx, model: nn.Module, lora_run) -> None:
    """Refuse a sharded run that cannot work, before any state is built."""
    if not ctx.enabled:
        raise UserError("shard_model = True shards the model across the processes of "
                        "a --distributed run: launch with torchrun or mpirun and "
                        "--distributed, or set shard_model = False")
    if has_memory(model):
        raise UserError("shard_model does not support memory-mode models (texar's "
                        "cross-attention): train them unsharded")
    if lora_run is not None:
        raise UserError("shard_model and lora together are not supported: LoRA's "
                        "trained state is small, so use lora with --distributed alone "
                        "(DDP), or remove lora")


def block_groups(model: nn.Module):
    """The modules of each transformer block, one FSDP unit each."""
    dec = model.decoder
    for i in range(len(dec.self_attns)):
        yield [dec.self_attn_layer_norm[i], dec.self_attns[i],
               dec.poswise_layer_norm[i], dec.poswise_networks[i]]


def shard(model: nn.Module, ctx, precision: str) -> nn.Module:
    """fully_shard per block and at the root; `model` itself becomes the
    sharded module (FSDP2 works in place) and is returned."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy()
    if precision == "bf16" and ctx.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                      reduce_dtype=torch.float32)
    for group in block_groups(model):
        fully_shard(group, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor` on the CPU: a sharded (DTensor) one gathered from
    every rank (so every rank calls, in the same order), any other as it is."""
    from torch.distributed.tensor import DTensor
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


def save_gathered(path: str, state: Dict[str, Any], ctx) -> None:
    """`state` (a checkpoint whose model and optimizer entries hold the
    sharded tensors: model.state_dict(), optimizer.state_dict()) as one
    ordinary .ckpt at `path`, written by rank 0 while the tensors are gathered
    one at a time. Every rank calls, with the same structure."""
    save_streamed(path, state, gather_full, write=ctx.is_main)


def gathered_model(model: nn.Module, hparams: Dict[str, Any], ctx,
                   attention: str) -> Optional[nn.Module]:
    """An unsharded copy of the sharded `model` on rank 0 (None on the other
    ranks), in eval mode, for decoding (samples, --do_test: the decoding
    engine reads whole weights); its weights are gathered one tensor at a
    time. Every rank calls."""
    weights = {}
    for name, tensor in model.state_dict().items():
        full = gather_full(tensor)
        if ctx.is_main:
            weights[name] = full.to(ctx.device)
    if not ctx.is_main:
        return None
    copy = build_meta_model(hparams, attention=attention)
    place_parameters(copy, lambda name, param: weights[name])
    return copy.eval()


def _names(model: nn.Module) -> Dict[int, str]:
    return {id(param): name for name, param in model.named_parameters()}


def load_full_optimizer_state(model: nn.Module, optimizer, state: Dict[str, Any]) -> None:
    """Load an unsharded-layout optimizer state (any world size wrote it):
    every rank passes the full state and keeps its shard (ShardedAdafactor,
    which keeps its small state whole, keeps all of it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    names = _names(model)
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state["param_groups"]
    if (len(saved_groups) != len(optimizer.param_groups)
            or sum(len(g["params"]) for g in saved_groups) != len(ordered)):
        raise ValueError("the saved optimizer has other parameter groups")
    if isinstance(optimizer, ShardedAdafactor):
        optimizer.load_state_dict(state)
        return
    by_name = {"state": {ordered[int(i)]: value for i, value in state["state"].items()},
               "param_groups": [{**g, "params": [ordered[int(i)] for i in g["params"]]}
                                for g in saved_groups]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=_options(flatten_optimizer_state_dict=False))
