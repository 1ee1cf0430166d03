"""One rank of tests/test_sharding.py::test_sharded_save_gathers_one_tensor_at_a_time,
in a module of its own: each spawned rank imports only this, not the test
modules (and what they import)."""
import types
import weakref

import torch
import torch.distributed as dist

from utils.model import build_model, gpt2_hparams
from utils.training import sharding
from utils.training.lm import lm_nll

HPARAMS = gpt2_hparams(50257, 32, 16, 2, 2)  # tests/test_lora.py's model


def save_on_two_ranks(rank, store, path):
    """One rank of test_sharded_save_gathers_one_tensor_at_a_time: shard, take
    an AdamW step, save with every gathered tensor watched."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        ctx = types.SimpleNamespace(device=torch.device("cpu"), is_main=rank == 0)
        model = sharding.shard(build_model(HPARAMS).train(), ctx, "fp32")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 50257, (2, 8))
        nll, _ = lm_nll(model, ids, torch.tensor([8, 8]))
        nll.backward()
        optimizer.step()
        made, peak = [], [0]
        gather = sharding.gather_full

        def watched(tensor):  # bytes of gathered tensors alive at once
            full = gather(tensor)
            made.append(weakref.ref(full))
            peak[0] = max(peak[0], sum(t.numel() * t.element_size()
                                       for t in (r() for r in made) if t is not None))
            return full

        sharding.gather_full = watched
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        sharding.save_gathered(path, state, ctx)
        sharding.gather_full = gather
        full = [gather(t) for t in (*state["model"].values(),
                                    *(v for s in state["optimizer"]["state"].values()
                                      for v in s.values()))]
        if rank == 0:
            largest = max(t.numel() * t.element_size() for t in full)
            # Never two gathered tensors at once: the largest one, not the sum.
            assert peak[0] == largest < sum(t.numel() * t.element_size() for t in full)
            saved = torch.load(path, weights_only=True)
            names = list(state["model"])
            for name, tensor in zip(names, full):
                assert torch.equal(saved["model"][name], tensor), name
            moments = [v for s in saved["optimizer"]["state"].values() for v in s.values()]
            for got, want in zip(moments, full[len(names):]):
                assert torch.equal(got, want)
        # Both ranks tear gloo down together: rank 1 leaving while rank 0 was
        # still checking once aborted in gloo's teardown ("terminate called
        # without an active exception", in one CI run of many).
        dist.barrier()
    finally:
        dist.destroy_process_group()
