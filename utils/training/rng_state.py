"""Random-number states in a training checkpoint, so a resumed run continues exactly.

Every rank's torch (and CUDA) generator, Python's and numpy's, stored as plain
types only (lists, ints, uint8 tensors) so that checkpoints load with
`torch.load(weights_only=True)`.
"""
import random
from typing import Any, Dict

import numpy as np
import torch

from utils.training import distributed as dist_utils


def seed_new_run(seed: int, rank: int) -> None:
    """A run that does not resume: dropout differs per rank (data order comes
    from the sampler, seeded apart)."""
    torch.manual_seed(seed + rank)
    random.seed(seed)
    np.random.seed(seed)


def _local_rng_bytes(device: torch.device) -> torch.Tensor:
    parts = [torch.get_rng_state()]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    return torch.cat(parts)


def gather_rng_states(ctx) -> Dict[str, Any]:
    """Every rank's torch (and CUDA) RNG state; call on all ranks together."""
    local = _local_rng_bytes(ctx.device).to(torch.int64)
    table = torch.zeros(ctx.world_size, local.numel(), dtype=torch.int64)
    table[ctx.rank] = local
    dist_utils.all_reduce_sum(table, ctx)
    np_state = np.random.get_state()
    return {
        "world_size": ctx.world_size,
        "cpu_bytes": int(torch.get_rng_state().numel()),
        "ranks": [row.to(torch.uint8) for row in table],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def restore_rng_states(state: Dict[str, Any], ctx) -> bool:
    """Restore this rank's RNG states; False when the saved layout differs."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    if state["world_size"] != ctx.world_size:
        return False
    mine = state["ranks"][ctx.rank]
    cpu = state["cpu_bytes"]
    torch.set_rng_state(mine[:cpu].clone())
    if ctx.device.type == "cuda":
        if mine.numel() == cpu:
            return False
        torch.cuda.set_rng_state(mine[cpu:].clone(), ctx.device)
    return True


def _as_tuples(value):
    """random.setstate wants tuples where a round trip may give lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
