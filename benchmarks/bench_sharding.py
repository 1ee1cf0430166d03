"""Per-process peak memory of sharded training (shard_model = True) with 1 or N processes.

Run under torchrun; each rank builds a randomly initialised GPT-2 of a released
size, shards it as the trainer does (utils/training/sharding.py), and takes
--steps AdamW steps (gradient checkpointing on) on batch 1 x --tokens. Rank 0
prints one JSON line: size, world size, the largest ru_maxrss over ranks
(the build of the full model on every rank included: the trainer loads it
before sharding) and seconds per step after the first.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_sharding.py --size 117M --tokens 256
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_memory import SIZES  # noqa: E402
from utils.model import build_model, gpt2_hparams  # noqa: E402
from utils.training import sharding  # noqa: E402
from utils.training.distributed import init_distributed  # noqa: E402
from utils.heap import map_large_blocks_separately  # noqa: E402
from utils.training.lm import lm_nll  # noqa: E402
from utils.training.memory_options import enable_gradient_checkpointing  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="117M", choices=list(SIZES))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    map_large_blocks_separately()  # as gpt2_train_main.py does
    ctx = init_distributed(True, backend="gloo")
    torch.manual_seed(0)
    model = build_model(gpt2_hparams(**SIZES[args.size])).train()
    enable_gradient_checkpointing(model)
    sharding.shard(model, ctx, "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50257, (1, args.tokens))
    lengths = torch.tensor([args.tokens])
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        nll, tokens = lm_nll(model, ids, lengths)
        (nll / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if ctx.is_main:
        print(json.dumps({"size": args.size, "tokens": args.tokens, "world": ctx.world_size,
                          "peak_gb_per_process": round(float(peak) * 1.073741824, 2),
                          "s_per_step": round(sum(times[1:]) / max(len(times) - 1, 1), 2)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
