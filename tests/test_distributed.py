"""utils/distributed.py: data sharding, launcher environments, real multi-process runs.

The multi-process tests start real processes talking Gloo over 127.0.0.1. This
file is also their worker: `python tests/test_distributed.py <mode> <out_dir>`
(see `worker_main`), launched by torchrun, by mpirun, or by hand with torchrun's
variables set.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from utils import distributed as D  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402

THIS_FILE = os.path.abspath(__file__)

# ------------------------------------------------------------------ the toy job
# A tiny LM on variable-length sequences, trained the way the trainer does it:
# per optimizer step, loss = (sum of token NLL) / (token count over all ranks
# and micro-batches), times world size because DDP averages gradients.
N_EXAMPLES, SEQ, VOCAB = 26, 6, 40     # 26 is not a multiple of the global batch
PER_RANK_BATCH, ACCUM, WORLD = 2, 2, 2
EPOCHS, RESUME_AT = 2, 8               # epoch 1 "resumes" after 8 global examples


def toy_data():
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, VOCAB, (N_EXAMPLES, SEQ), generator=gen)
    lengths = torch.randint(2, SEQ + 1, (N_EXAMPLES,), generator=gen)
    return ids, lengths


def toy_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, VOCAB))


def nll_and_count(model, ids, lengths):
    """Sum of next-token NLL over the real (unpadded) targets, and their number."""
    logits = model(ids[:, :-1])
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    mask = (torch.arange(SEQ - 1)[None, :] < (lengths[:, None] - 1)).reshape(-1)
    return (nll * mask).sum(), mask.sum()


def train_toy(ctx, batches_per_epoch_fn):
    """Train the toy LM; batches_per_epoch_fn(epoch) -> list of index lists of this rank."""
    ids, lengths = toy_data()
    model = D.wrap_model(toy_model().to(ctx.device), ctx)
    losses = []
    for epoch in range(EPOCHS):
        batches = batches_per_epoch_fn(epoch)
        for s in range(0, len(batches), ACCUM):
            micro = batches[s:s + ACCUM]
            count = torch.tensor(float(sum((lengths[b] - 1).sum() for b in micro)))
            D.all_reduce_sum(count, ctx)
            step_nll = torch.zeros(())
            for j, b in enumerate(micro):
                with D.maybe_no_sync(model, sync=j == len(micro) - 1):
                    nll, _ = nll_and_count(model, ids[b], lengths[b])
                    (nll * ctx.world_size / count).backward()
                step_nll += nll.detach()
            with torch.no_grad():  # plain SGD: torch.optim's first step imports dynamo (2 s)
                for p in model.parameters():
                    p -= 0.5 * p.grad
                    p.grad = None
            losses.append(float(D.all_reduce_sum(step_nll, ctx) / count))
    return D.unwrap_model(model), losses


def rank_batches(ctx, per_rank_batch):
    """This rank's batches for each epoch, as the trainer's DataLoader yields them."""
    sampler = D.make_train_sampler(N_EXAMPLES, ctx, seed=11)

    def for_epoch(epoch):
        sampler.set_epoch(epoch)
        if epoch == 1:
            sampler.set_start(RESUME_AT)
        loader = torch.utils.data.DataLoader(range(N_EXAMPLES), batch_size=per_rank_batch,
                                             sampler=sampler)
        return [b.tolist() for b in loader]
    return for_epoch


# ------------------------------------------------------------------ worker side

def worker_main(mode, out_dir, timeout_s=300.0):
    ctx = D.init_distributed(True, timeout_s=timeout_s)
    try:
        with D.peer_failure_guard(ctx):
            if mode == "ddp":
                worker_ddp(ctx, out_dir)
            elif mode == "die_in_step":   # rank 1 vanishes between optimizer steps
                ids, lengths = toy_data()
                model = D.wrap_model(toy_model(), ctx)
                for step in range(3):
                    if step == 1 and ctx.rank == 1:
                        os._exit(3)
                    nll, _ = nll_and_count(model, ids[:2], lengths[:2])
                    nll.backward()      # DDP's all-reduce fails here on rank 0
            elif mode == "die_at_barrier":  # rank 0 dies "evaluating"; rank 1 waits
                if ctx.rank == 0:
                    time.sleep(1.0)
                    os._exit(3)
                D.barrier(ctx)
            elif mode == "hang":          # rank 1 stops taking part but stays alive
                if ctx.rank == 1:
                    time.sleep(120)
                D.all_reduce_sum(torch.ones(2), ctx)
    finally:
        D.shutdown(ctx)
        D.shutdown(ctx)  # twice is harmless


def worker_ddp(ctx, out_dir):
    model, losses = train_toy(ctx, rank_batches(ctx, PER_RANK_BATCH))
    # all_reduce_sum, broadcast_object and barrier with real peers
    total = D.all_reduce_sum(torch.tensor([ctx.rank + 1.0, 10.0]), ctx)
    note = D.broadcast_object({"from": ctx.rank, "text": "héllo"} if ctx.is_main else None,
                              ctx)
    D.barrier(ctx)
    if ctx.is_main:
        tmp = os.path.join(out_dir, "result.pt.tmp")
        torch.save({"state": model.state_dict(), "losses": torch.tensor(losses),
                    "total": total, "world": ctx.world_size,
                    "launcher": ctx.launcher}, tmp)
        os.replace(tmp, os.path.join(out_dir, "result.pt"))
    with open(os.path.join(out_dir, f"rank{ctx.rank}.txt"), "w") as f:
        f.write(f"{ctx.rank} {ctx.world_size} {ctx.local_rank} {ctx.launcher} "
                f"{note['from']} {note['text']}\n")


# ------------------------------------------------------------------ helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def mpirun_cmd(n):
    """The original example's mpirun shape for one machine (loopback instead of ens3)."""
    cmd = ["mpirun", "-np", str(n), "-H", f"localhost:{n}", "-bind-to", "none",
           "-map-by", "slot", "-x", "PATH", "-x", "MASTER_PORT",
           "-mca", "pml", "ob1", "-mca", "btl", "tcp,self", "-mca", "btl_tcp_if_include", "lo"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")  # CI containers run as root
    return cmd


def check_toy_result(out_dir, launcher):
    result = torch.load(os.path.join(out_dir, "result.pt"), weights_only=True)
    assert result["world"] == WORLD and result["launcher"] == launcher
    assert result["total"].tolist() == [3.0, 20.0]
    for r in range(WORLD):
        with open(os.path.join(out_dir, f"rank{r}.txt")) as f:
            assert f.read().split() == [str(r), str(WORLD), str(r), launcher, "0", "héllo"]

    # One process, global batch = WORLD x per-rank batch, same data order.
    single = D.DistContext(False, 0, 1, 0, torch.device("cpu"), True)
    model, losses = train_toy(single, rank_batches(single, WORLD * PER_RANK_BATCH))
    assert len(losses) == len(result["losses"])
    assert torch.allclose(torch.tensor(losses), result["losses"], atol=1e-6)
    for name, value in model.state_dict().items():
        assert (value - result["state"][name]).abs().max() <= 1e-5, name
    # and the steps did change the weights
    assert (toy_model().state_dict()["2.weight"] - model.state_dict()["2.weight"]).abs().max() > 1e-3


# ------------------------------------------------------------------ sharding

def all_rank_orders(n, world, seed=0, epoch=0, start=0, shuffle=True):
    samplers = [D.ShardSampler(n, r, world, seed=seed, shuffle=shuffle) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
        s.set_start(start)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("n,world,batch", [(24, 2, 3), (40, 4, 2), (12, 3, 4), (9, 1, 2)])
def test_step_k_of_all_ranks_is_step_k_of_one_process(n, world, batch):
    (single,) = all_rank_orders(n, 1, seed=5, epoch=2)
    shards = all_rank_orders(n, world, seed=5, epoch=2)
    assert sorted(single) == list(range(n))
    steps = len(shards[0]) // batch
    for k in range(steps):
        union = set()
        for shard in shards:
            union.update(shard[k * batch:(k + 1) * batch])
        assert union == set(single[k * world * batch:(k + 1) * world * batch])
    # rank r holds every world-th index of the one global order
    for r, shard in enumerate(shards):
        assert shard == single[r::world]


def test_order_is_reseeded_every_epoch_and_reproducible():
    e0, e1 = all_rank_orders(50, 1, seed=3, epoch=0)[0], all_rank_orders(50, 1, seed=3, epoch=1)[0]
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(50))
    assert all_rank_orders(50, 1, seed=3, epoch=1)[0] == e1           # same seed+epoch
    assert all_rank_orders(50, 1, seed=4, epoch=1)[0] != e1
    assert all_rank_orders(7, 1, shuffle=False)[0] == list(range(7))  # no shuffle: in order


def test_uneven_length_pads_by_wrapping_so_ranks_take_equal_steps():
    n, world = 11, 4
    (single,) = all_rank_orders(n, 1, seed=1)
    shards = all_rank_orders(n, world, seed=1)
    assert {len(s) for s in shards} == {3}                 # ceil(11 / 4)
    padded = single + single[:1]
    for r, shard in enumerate(shards):
        assert shard == padded[r::world]
    assert set().union(*shards) == set(range(n))           # every example seen
    # more ranks than examples still works
    shards = all_rank_orders(2, 5, seed=1)
    assert [len(s) for s in shards] == [1] * 5 and set().union(*shards) == {0, 1}
    assert all_rank_orders(0, 2) == [[], []]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_skips_examples_already_trained_on(world):
    n, start = 30, 12
    (single,) = all_rank_orders(n, 1, seed=9, epoch=4)
    shards = all_rank_orders(n, world, seed=9, epoch=4, start=start)
    rest = single[start:]
    rest += single[:(-len(rest)) % world]
    for r, shard in enumerate(shards):
        assert shard == rest[r::world]
    # set_epoch starts the next epoch from its beginning again
    s = D.ShardSampler(n, 0, 1, seed=9)
    s.set_epoch(4)
    s.set_start(start)
    assert len(s) == n - start
    s.set_epoch(5)
    assert len(s) == n and list(s) == all_rank_orders(n, 1, seed=9, epoch=5)[0]
    with pytest.raises(ValueError):
        s.set_start(n + 1)


def test_make_train_sampler_and_global_batch_text():
    ctx = D.DistContext(True, 1, 4, 1, torch.device("cpu"), False, "gloo", "torchrun")
    sampler = D.make_train_sampler(40, ctx, seed=2)
    assert (sampler.rank, sampler.world_size, len(sampler)) == (1, 4, 10)
    assert D.global_batch_size(8, ctx, 2) == 64
    assert "per-rank batch 8 x world size 4 x accumulation 2 = 64" in D.describe(ctx, 8, 2)
    single = D.init_distributed(False)
    assert D.global_batch_size(8, single, 2) == 16 and "= 16" in D.describe(single, 8, 2)


# ------------------------------------------------------------------ launcher environments

TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}


def ompi_env(rank=1, size=2, local_rank=1, local_size=2, **extra):
    env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
           "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
           "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size)}
    env.update(extra)
    return env


def test_torchrun_environment():
    info = D.launch_info(dict(TORCHRUN_ENV))
    assert (info.launcher, info.rank, info.world_size, info.local_rank,
            info.master_addr, info.master_port) == ("torchrun", 3, 4, 1, "10.0.0.1", 29555)
    env = dict(TORCHRUN_ENV)
    del env["MASTER_PORT"]
    with pytest.raises(UserError, match="MASTER_PORT"):
        D.launch_info(env)


def test_openmpi_environment_on_one_machine_defaults_to_loopback():
    info = D.launch_info(ompi_env())
    assert (info.launcher, info.rank, info.world_size, info.local_rank,
            info.master_addr, info.master_port) == ("mpirun", 1, 2, 1, "127.0.0.1", 29500)
    info = D.launch_info(ompi_env(MASTER_ADDR="host0", MASTER_PORT="1234"))
    assert (info.master_addr, info.master_port) == ("host0", 1234)
    # flags win over the environment
    info = D.launch_info(ompi_env(MASTER_ADDR="host0", MASTER_PORT="1234"),
                         master_addr="host9", master_port=4321)
    assert (info.master_addr, info.master_port) == ("host9", 4321)


def test_openmpi_across_machines_needs_the_rank0_address():
    env = ompi_env(rank=3, size=4, local_rank=1, local_size=2)
    with pytest.raises(UserError) as err:
        D.launch_info(env)
    text = str(err.value)
    for needed in ("MASTER_ADDR", "MASTER_PORT", "--master_addr", "--master_port", "mpirun -x"):
        assert needed in text
    info = D.launch_info(dict(env, MASTER_ADDR="192.168.11.22", MASTER_PORT="29501"))
    assert (info.rank, info.local_rank, info.master_addr) == (3, 1, "192.168.11.22")
    with pytest.raises(UserError, match="port"):
        D.launch_info(dict(env, MASTER_ADDR="h"))                  # address but no port
    with pytest.raises(UserError, match="not a TCP port"):
        D.launch_info(dict(env, MASTER_ADDR="h", MASTER_PORT="http"))
    with pytest.raises(UserError, match="OMPI_COMM_WORLD_RANK"):
        D.launch_info(ompi_env(OMPI_COMM_WORLD_RANK="x"))


def test_no_launcher_says_how_to_launch(monkeypatch):
    for name in list(TORCHRUN_ENV) + list(ompi_env()):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError) as err:
        D.init_distributed(True)
    assert "torchrun --nproc_per_node" in str(err.value) and "mpirun -np" in str(err.value)


def test_launched_without_distributed_flag_is_refused(monkeypatch):
    for name in list(TORCHRUN_ENV) + list(ompi_env()):
        monkeypatch.delenv(name, raising=False)
    ctx = D.init_distributed(False)
    assert (ctx.enabled, ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (
        False, 0, 1, 0, True)
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    D.shutdown(ctx)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--distributed is not set"):
        D.init_distributed(False)


def test_single_process_helpers_are_identities():
    ctx = D.init_distributed(False)
    t = torch.tensor([1.5])
    assert D.all_reduce_sum(t, ctx) is t and t.item() == 1.5
    assert D.broadcast_object({"a": 1}, ctx) == {"a": 1}
    D.barrier(ctx)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, ctx) is model and D.unwrap_model(model) is model
    with D.peer_failure_guard(ctx), pytest.raises(RuntimeError):
        raise RuntimeError("Connection reset by peer")   # untouched for one process


def test_user_error_is_one_line_exit_2(monkeypatch, capsys):
    for name in list(TORCHRUN_ENV) + list(ompi_env()):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: D.init_distributed(True))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --distributed needs a launcher") and err.count("\n") == 1


# ------------------------------------------------------------------ real processes (Gloo)

def run_checked(cmd, env, timeout=120):
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_ranks_match_one_process(tmp_path):
    port = free_port()
    run_checked([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                 "--nproc_per_node", str(WORLD), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port}", "--max_restarts", "0",
                 THIS_FILE, "ddp", str(tmp_path)], worker_env())
    check_toy_result(tmp_path, "torchrun")


@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="OpenMPI's mpirun is not installed (Debian: apt-get install "
                           "openmpi-bin); the mpirun launch path is untested here")
def test_mpirun_two_ranks_match_one_process(tmp_path):
    run_checked(mpirun_cmd(WORLD) + [sys.executable, THIS_FILE, "ddp", str(tmp_path)],
                worker_env(MASTER_PORT=free_port()))
    check_toy_result(tmp_path, "mpirun")


def start_pair(mode, tmp_path, timeout_s):
    """Two ranks started by hand with torchrun's variables (no launcher to clean up)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, THIS_FILE, mode, str(tmp_path), str(timeout_s)],
                             env=worker_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r,
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for r in range(2)]


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"rank hung past {timeout} s: {err[-2000:]}")
    return proc.returncode, err


def test_lost_rank_ends_the_others_with_a_message(tmp_path):
    """A rank that dies or hangs ends its peers with a one-line error, exit 2.

    Three two-rank jobs run at once (to keep the suite short), started by hand
    with torchrun's variables so no launcher cleans up for us:
    - die_in_step: rank 1 exits during training; rank 0's DDP all-reduce fails;
    - die_at_barrier: rank 0 exits while rank 1 waits for it at barrier() (whose
      wait timeout is hours): rank 1 notices the death at once;
    - hang: rank 1 stays alive but stops taking part; rank 0 times out (5 s).
    """
    jobs = {"die_in_step": (start_pair("die_in_step", tmp_path, 600), 1, 0),
            "die_at_barrier": (start_pair("die_at_barrier", tmp_path, 600), 0, 1),
            "hang": (start_pair("hang", tmp_path, 5), 1, 0)}
    try:
        for mode, (procs, quitter, survivor) in jobs.items():
            rc, err = finish(procs[survivor], 90)
            assert rc == 2, (mode, err[-2000:])
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"error: rank {survivor} of 2: another rank stopped "
                                   f"responding"), (mode, err[-2000:])
            assert "Traceback" not in err, (mode, err[-2000:])
            if mode == "hang":
                assert "Timed out" in last
            else:
                assert finish(procs[quitter], 30)[0] == 3
    finally:
        for procs, _, _ in jobs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()


if __name__ == "__main__":
    # worker: python tests/test_distributed.py <mode> <out_dir> [timeout_s]
    run_main(worker_main, sys.argv[1], sys.argv[2],
             float(sys.argv[3]) if len(sys.argv) > 3 else 300.0)
