"""Adafactor for a sharded model (shard_model = True): torch's Adafactor with
its state kept whole on every rank.

torch's Adafactor cannot step sharded (DTensor) weights: the row and column
means of grad^2 it keeps for a matrix, and the weight's RMS that scales each
step, are sums over the whole matrix, which no rank's shard holds. Its state
is small (a row and a column vector per matrix, a vector's own size for a
vector), so instead of sharding it, every rank keeps all of it, identical:
for one parameter at a time, the full gradient and the full weight are
gathered from the ranks, torch's own Adafactor steps them with the kept
state, each rank copies its rows of the new weight into its shard, and the
full tensors are dropped. Peak memory: the shards plus one full weight and
its gradient.

The state is torch's Adafactor layout with whole tensors, so the optimizer
entry of a checkpoint is what an unsharded run writes, and loads as it is
(torch's load_state_dict) with any number of ranks, sharded or not.
"""
import torch
from torch import Tensor


def _full(tensor: Tensor) -> Tensor:
    """The whole of a sharded (DTensor) tensor, gathered from every rank (so
    every rank calls, in the same order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _store(param: Tensor, full: Tensor) -> None:
    """Copy this rank's part of the stepped `full` weight into `param`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return  # `full` is `param` itself, stepped in place
    # src_data_rank=None: each rank cuts its own part out of its own copy
    # (the ranks' copies are equal), without communicating.
    mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(mine.to_local())


class ShardedAdafactor(torch.optim.Adafactor):
    """torch.optim.Adafactor (the same arguments, state_dict and
    load_state_dict) whose step works on sharded weights; see the module
    docstring. Every rank calls step."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            options = {key: value for key, value in group.items() if key != "params"}
            for param in group["params"]:
                if param.grad is None:
                    continue
                full = _full(param)
                if full is not param:
                    full.grad = _full(param.grad)
                # torch's arithmetic on the whole tensors: a one-parameter
                # Adafactor whose state is this parameter's kept state (the
                # same dict: torch creates it on the first step, and updates
                # its tensors in place).
                one = torch.optim.Adafactor([{**options, "params": [full]}])
                one.state[full] = self.state[param]
                one.step()
                _store(param, full)
                del full, one
        return loss
