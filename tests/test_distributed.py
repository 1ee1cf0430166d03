"""utils/training/distributed.py: data sharding, launcher environments, real multi-process runs.

Multi-process tests start real processes talking Gloo over 127.0.0.1:
- lost ranks: this file is the worker (`python tests/test_distributed.py <mode>
  <out_dir> [timeout_s]`, see `worker_main`), started by hand with torchrun's
  variables so no launcher cleans up after a failure;
- end to end: gpt2_train_main.py under torchrun and under the original example's
  mpirun command, against one process (weights, losses, dev perplexity, resume).
Ranks and runs are processes of tests/script_server.py (started through its
client, which torchrun runs with --no-python), except under mpirun, where
they are plain `python` processes.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import script_server
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from utils.training import distributed as D  # noqa: E402
from utils.data.records import PAD_INDEX, ShardSampler  # noqa: E402
from utils.errors import UserError, run_main  # noqa: E402

THIS_FILE = os.path.abspath(__file__)

# ------------------------------------------------------------------ worker side

def tiny_lm():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20))


def worker_main(mode, out_dir, timeout_s=300.0):
    """Join a 2-rank Gloo job, check the collectives, then fail as `mode` says."""
    ctx = D.init_distributed(True, timeout_s=timeout_s)
    try:
        with D.peer_failure_guard(ctx):
            total = D.all_reduce_sum(torch.tensor([ctx.rank + 1.0]), ctx)
            from_main = D.all_reduce_sum(torch.tensor([42.0 if ctx.is_main else 0.0]), ctx)
            D.barrier(ctx)
            with open(os.path.join(out_dir, f"{mode}.rank{ctx.rank}"), "w") as f:
                f.write(f"{ctx.rank} {ctx.world_size} {ctx.local_rank} {ctx.backend} "
                        f"{total.item():g} {from_main.item():g}")
                ctx.print(" rank-0-only", end="", file=f)
            if mode == "die_in_step":       # rank 1 vanishes between steps
                model = D.wrap_model(tiny_lm(), ctx)
                for step in range(3):
                    if step == 1 and ctx.rank == 1:
                        os._exit(3)
                    model(torch.arange(6)).sum().backward()  # DDP all-reduce fails here
            elif mode == "die_at_barrier":  # rank 0 dies "evaluating"; rank 1 waits
                if ctx.rank == 0:
                    time.sleep(1.0)
                    os._exit(3)
                D.barrier(ctx)
            elif mode == "hang":            # rank 1 stops taking part but stays alive
                if ctx.rank == 1:
                    time.sleep(120)
                D.all_reduce_sum(torch.ones(2), ctx)
    finally:
        D.shutdown(ctx)
        D.shutdown(ctx)  # twice is harmless


# ------------------------------------------------------------------ helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_python():
    """`python` for a rank or a run: the script server's client
    (tests/script_server.py), so that it does not import torch anew. The
    mpirun resume keeps real python processes."""
    return script_server.client_command(script_server.server_socket())


def worker_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------ sharding

def all_rank_orders(n, world, seed=0, epoch=0, start=0, shuffle=True):
    samplers = [ShardSampler(n, r, world, seed=seed, shuffle=shuffle) for r in range(world)]
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


def test_uneven_length_pads_with_empty_slots_so_ranks_take_equal_steps():
    n, world = 11, 4
    (single,) = all_rank_orders(n, 1, seed=1)
    shards = all_rank_orders(n, world, seed=1)
    assert {len(s) for s in shards} == {3}                 # ceil(11 / 4)
    padded = single + [PAD_INDEX]
    for r, shard in enumerate(shards):
        assert shard == padded[r::world]
    seen = [i for shard in shards for i in shard if i != PAD_INDEX]
    assert sorted(seen) == list(range(n))                  # every example once
    # more ranks than examples still works
    shards = all_rank_orders(2, 5, seed=1)
    assert [len(s) for s in shards] == [1] * 5
    assert sorted(i for s in shards for i in s) == [PAD_INDEX] * 3 + [0, 1]
    assert all_rank_orders(0, 2) == [[], []]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_skips_examples_already_trained_on(world):
    n, start = 30, 12
    (single,) = all_rank_orders(n, 1, seed=9, epoch=4)
    shards = all_rank_orders(n, world, seed=9, epoch=4, start=start)
    rest = single[start:]
    rest += [PAD_INDEX] * ((-len(rest)) % world)
    for r, shard in enumerate(shards):
        assert shard == rest[r::world]
    # set_epoch starts the next epoch from its beginning again
    s = ShardSampler(n, 0, 1, seed=9)
    s.set_epoch(4)
    s.set_start(start)
    assert len(s) == n - start
    s.set_epoch(5)
    assert len(s) == n and list(s) == all_rank_orders(n, 1, seed=9, epoch=5)[0]
    with pytest.raises(ValueError):
        s.set_start(n + 1)


def test_sampler_layout_and_global_batch_text():
    ctx = D.DistContext(True, 1, 4, 1, torch.device("cpu"), False, "gloo", "torchrun")
    sampler = ShardSampler(40, ctx.rank, ctx.world_size, seed=2)
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
    D.barrier(ctx)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, ctx) is model
    with D.peer_failure_guard(ctx), pytest.raises(RuntimeError):
        raise RuntimeError("Connection reset by peer")   # untouched for one process



def test_print_is_rank_0_only_and_flushed(capsys, monkeypatch):
    def context(rank):
        return D.DistContext(True, rank, 2, rank, torch.device("cpu"), rank == 0)

    flushed = []
    real_print = print
    monkeypatch.setattr("builtins.print",
                        lambda *a, **k: flushed.append(k.get("flush")) or real_print(*a, **k))
    context(0).print("step", 3, sep="=")
    context(1).print("step", 3, sep="=")
    D.init_distributed(False).print("one process")
    context(0).print("to stderr", file=sys.stderr)
    out, err = capsys.readouterr()
    assert (out, err) == ("step=3\none process\n", "to stderr\n")
    assert flushed == [True, True, True]

def test_user_error_is_one_line_exit_2(monkeypatch, capsys):
    for name in list(TORCHRUN_ENV) + list(ompi_env()):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: D.init_distributed(True))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --distributed needs a launcher") and err.count("\n") == 1


# ------------------------------------------------------------------ real processes (Gloo)

def start_pair(mode, tmp_path, timeout_s):
    """Two ranks started by hand with torchrun's variables (no launcher to clean up)."""
    port = free_port()
    return [subprocess.Popen(served_python() + [THIS_FILE, mode, str(tmp_path), str(timeout_s)],
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
            with open(tmp_path / f"{mode}.rank{survivor}") as f:   # collectives worked
                assert f.read().split() == [str(survivor), "2", str(survivor), "gloo",
                                            "3", "42"] + ["rank-0-only"] * (survivor == 0)
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


# ------------------------------------------------------------------ the trainer, end to end
# gpt2_train_main.py on 17 toy lines with a tiny model (2 layers, 16 wide), AdamW
# at the default fine-tuning rate: 2 epochs of 3 steps, dev evaluation every 2
# steps. Three runs, global batch 8 in each:
#   A  one process, batch 8, all 6 steps;
#   B  torchrun, 2 ranks x batch 2 x accumulation 2, stops after 2 steps (mid-epoch,
#      at an evaluation, which its --do_eval reuses);
#   C  the original example's mpirun shape, 2 ranks, resumes B's checkpoint, goes
#      on into the second epoch and writes the test samples.
# 17 examples: the last step of each epoch has one, so one rank's micro-batch is
# an empty slot, which must not train any example twice.
# B and C together must be A: every step's loss, every dev evaluation, the weights.

TRAIN_EXAMPLES = 17
TRAIN_CONFIG = """
data_dir = {data_dir!r}
max_seq_length = 32
train_batch_size = {batch}
gradient_accumulation_steps = {accum}
eval_batch_size = 8
test_batch_size = 8
max_train_epoch = 2
display_steps = 1
eval_steps = 2
checkpoint_steps = -1
warmup_steps = 0
lr_decay = "linear"
opt = {{"optimizer": {{"type": "AdamW", "kwargs": {{"lr": 1e-4, "weight_decay": 0.01}}}},
       "gradient_clip": {{"type": "clip_grad_norm_", "kwargs": {{"max_norm": 1.0}}}}}}
seed = 3
"""


@pytest.fixture(scope="module")
def toy_job(tmp_path_factory):
    from utils.data.records import PreparedSplit
    from utils.data.prepare import prepare_split
    root = tmp_path_factory.mktemp("toy_job")
    data_dir = root / "data"
    with open(os.path.join(REPO_ROOT, "data", "toy", "train.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()[:TRAIN_EXAMPLES]
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sources = {"train": str(root / "train.txt")}
    for split in ("train", "dev", "test"):
        prepare_split(sources.get(split, os.path.join(REPO_ROOT, "data", "toy", f"{split}.txt")),
                      str(data_dir / f"{split}.npy"), max_seq_length=32, vocab_dir=None,
                      num_workers=1, progress=False)
    assert len(PreparedSplit(str(data_dir / "train.npy"))) == TRAIN_EXAMPLES
    (root / "model_cfg.py").write_text(
        "from utils.model import gpt2_hparams\nhparams = gpt2_hparams(50257, 64, 16, 2, 2)\n")
    (root / "single_cfg.py").write_text(TRAIN_CONFIG.format(data_dir=str(data_dir), batch=8,
                                                            accum=1))
    (root / "dist_cfg.py").write_text(TRAIN_CONFIG.format(data_dir=str(data_dir), batch=2,
                                                          accum=2))
    return root


def trainer_args(job, config, out, *extra):
    return ["gpt2_train_main.py", "--do_train", "--do_eval", "--from_scratch",
            "--config_model", str(job / "model_cfg.py"), "--config_train", str(job / config),
            "--output_dir", str(job / out), "--quiet", *extra]


def start(cmd, env):
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished_ok(proc, timeout=180):
    """The stdout of `proc`, once it has exited 0."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{proc.args} still running after {timeout} s")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def run_ok(cmd, env, timeout=180):
    return finished_ok(start(cmd, env), timeout)


def records(job, out):
    import json
    with open(job / out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def metrics(job, out):
    train = {r["step"]: r["loss"] for r in records(job, out) if r["split"] == "train"}
    dev = [r for r in records(job, out) if r["split"] == "dev"]
    return train, dev


def original_mpirun_shape(n):
    """The original README's mpirun command on one machine: loopback instead of ens3,
    and a free MASTER_PORT exported so parallel test runs do not collide on 29500."""
    cmd = ["mpirun", "-np", str(n), "-H", f"localhost:{n}", "-bind-to", "none",
           "-map-by", "slot", "-x", "NCCL_DEBUG=INFO", "-x", "PATH", "-x", "MASTER_PORT",
           "-x", "OMP_NUM_THREADS", "-mca", "pml", "ob1", "-mca", "btl", "tcp,self",
           "-mca", "btl_tcp_if_include", "lo"]
    if os.environ.get("LD_LIBRARY_PATH"):
        cmd[cmd.index("PATH") + 1:cmd.index("PATH") + 1] = ["-x", "LD_LIBRARY_PATH"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")  # CI containers run as root
    return cmd


def run_a_b_c(job, have_mpirun):
    """The three runs (A alongside B; C after B); the stdout of each."""
    single = start(served_python() + trainer_args(job, "single_cfg.py", "A"), worker_env())
    try:   # A runs while B does: neither needs the other
        port = free_port()
        torchrun = run_ok([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                           "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", f"127.0.0.1:{port}", "--max_restarts", "0",
                           "--no-python", *served_python()]
                          + trainer_args(job, "dist_cfg.py", "B", "--stop_after_steps", "2",
                                         "--distributed"),
                          worker_env())
        single_out = finished_ok(single)
    finally:
        if single.poll() is None:
            single.kill()
            single.communicate()
    resume = trainer_args(job, "dist_cfg.py", "C", "--distributed", "--do_test",
                          "--checkpoint", str(job / "B" / "model.ckpt"))
    if have_mpirun:
        resumed = run_ok(original_mpirun_shape(2) + [sys.executable] + resume,
                         worker_env(MASTER_PORT=free_port()))
    else:  # still check the distributed resume, under torchrun
        resumed = run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2"] + resume, worker_env())
    return single_out, torchrun, resumed


def test_two_ranks_train_resume_and_evaluate_like_one_process(toy_job):
    job = toy_job
    load = lambda out: torch.load(job / out / "model.ckpt", weights_only=True)  # noqa: E731
    have_mpirun = shutil.which("mpirun") is not None
    single_out, torchrun, resumed = run_a_b_c(job, have_mpirun)

    # B: rank 0 alone logs, evaluates once and writes the outputs
    out = torchrun
    assert out.count("data-parallel via torchrun: 2 ranks") == 1, out
    assert out.count("global batch = per-rank batch 2 x world size 2 x accumulation 2 "
                     "= 8") == 1, out
    assert out.count("Stopped at step 2") == 1 and out.count("dev: loss") == 2, out
    assert sorted(os.listdir(job / "B")) == ["metrics.jsonl", "model.ckpt",
                                             "model_best.ckpt"]
    assert len(metrics(job, "B")[1]) == 1      # one dev evaluation, reused by --do_eval
    b_state = load("B")
    assert b_state["step"] == 2 and b_state["data"]["world_size"] == 2
    launcher = "mpirun" if have_mpirun else "torchrun"
    assert resumed.count(f"data-parallel via {launcher}: 2 ranks") == 1, resumed
    assert resumed.count("Training done: 6 steps") == 1, resumed

    # the same training losses, step by step, and the same records in the same order
    a_train, a_dev = metrics(job, "A")
    b_train, b_dev = metrics(job, "B")
    c_train, c_dev = metrics(job, "C")
    assert sorted(a_train) == [1, 2, 3, 4, 5, 6]
    assert sorted(b_train) == [1, 2] and sorted(c_train) == [3, 4, 5, 6]
    for step, loss in {**b_train, **c_train}.items():
        assert loss == pytest.approx(a_train[step], rel=1e-6), step
    order = lambda out: [(r["split"], r["step"]) for r in records(job, out)]  # noqa: E731
    assert order("A") == order("B") + order("C")

    # the same weights after step 6 and the same dev perplexities
    a_state, c_state = load("A"), load("C")
    assert c_state["step"] == a_state["step"] == 6
    moved = max((a_state["model"][k] - b_state["model"][k]).abs().max()
                for k in a_state["model"])
    assert moved > 5e-5          # steps 3-6 moved the weights well beyond the tolerance
    for name, value in a_state["model"].items():
        assert (value - c_state["model"][name]).abs().max() <= 1e-5, name
    assert [r["step"] for r in a_dev] == [2, 4, 6]
    assert [r["step"] for r in b_dev + c_dev] == [2, 4, 6]
    for a, other in zip(a_dev, b_dev + c_dev):
        assert other["ppl"] == pytest.approx(a["ppl"], rel=1e-6), a["step"]
    a_line = [l for l in single_out.splitlines() if l.startswith("dev:")]
    c_line = [l for l in resumed.splitlines() if l.startswith("dev:")]
    assert a_line == c_line and len(a_line) == 1

    # C: rank 0 alone continued every test line
    from utils.data.records import PreparedSplit
    test_lines = len(PreparedSplit(str(job / "data" / "test.npy")))
    assert test_lines == 8
    samples = (job / "C" / "test_samples.tsv").read_text(encoding="utf-8").split("\n")
    assert len(samples) == test_lines + 1 and samples[-1] == ""
    if not have_mpirun:
        pytest.skip("OpenMPI's mpirun is not installed (Debian: apt-get install "
                    "openmpi-bin): the resume ran under torchrun; the mpirun launch path "
                    "is untested here")


def test_two_ranks_with_memory_options_train_like_one_process(toy_job):
    """gradient_checkpointing and trainable="transformer" under DDP: the same
    losses as one process with the same options, embeddings untouched."""
    job = toy_job
    options = 'gradient_checkpointing = True\ntrainable = "transformer"\n'
    for name in ("single_cfg.py", "dist_cfg.py"):
        (job / f"mem_{name}").write_text((job / name).read_text() + options)
    single = start(served_python() + trainer_args(job, "mem_single_cfg.py", "mem_A",
                                                   "--stop_after_steps", "2"), worker_env())
    try:
        run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "--no-python", *served_python()]
               + trainer_args(job, "mem_dist_cfg.py", "mem_B", "--stop_after_steps", "2",
                              "--distributed"), worker_env())
        finished_ok(single)
    finally:
        if single.poll() is None:
            single.kill()
            single.communicate()
    a_train, _ = metrics(job, "mem_A")
    b_train, _ = metrics(job, "mem_B")
    assert sorted(a_train) == sorted(b_train) == [1, 2]
    for step, loss in b_train.items():
        assert loss == pytest.approx(a_train[step], rel=1e-6), step
    a_state = torch.load(job / "mem_A" / "model.ckpt", weights_only=True)
    b_state = torch.load(job / "mem_B" / "model.ckpt", weights_only=True)
    for name in ("word_embedder._embedding", "position_embedder._embedding"):
        assert torch.equal(a_state["model"][name], b_state["model"][name]), name
    for name, value in a_state["model"].items():
        assert (value - b_state["model"][name]).abs().max() <= 1e-5, name


if __name__ == "__main__":
    # worker: python tests/test_distributed.py <mode> <out_dir> [timeout_s]
    run_main(worker_main, sys.argv[1], sys.argv[2],
             float(sys.argv[3]) if len(sys.argv) > 3 else 300.0)
