"""Data-parallel training across processes: torchrun or OpenMPI's mpirun.

Each process ("rank") holds a full copy of the model, reads its own shard of
the training data and averages gradients with the others after every backward
pass (torch's DistributedDataParallel). GPUs talk over NCCL, one GPU per local
rank; CPU processes over Gloo.

Launchers. `init_distributed(True)` reads the launcher's environment:
- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
- mpirun (OpenMPI) sets OMPI_COMM_WORLD_RANK, _SIZE and _LOCAL_RANK. The
  rendezvous address and port come from MASTER_ADDR / MASTER_PORT or the
  `master_addr` / `master_port` arguments (the trainer's --master_addr and
  --master_port flags). When every rank runs on one machine they default to
  127.0.0.1 and 29500 (torchrun's default port), so the original example's
  `mpirun -np 2 ... python gpt2_train_main.py --distributed` works as is;
  across machines the address must be given.

Data order. `utils.data.records.ShardSampler` draws ONE permutation per epoch from seed + epoch,
whatever the world size, and rank r takes every W-th index of it
(perm[r::W]). With per-rank batch b, step k of W ranks therefore covers
exactly the examples of step k of a single process with batch W*b; the
trainer normalises the loss by the global token count, so W ranks reproduce
one process up to float rounding.

Failure. A rank that dies closes its sockets: the others' next collective
fails at once and `peer_failure_guard` turns that into `PeerFailureError`, a
one-line message and a non-zero exit. A rank that hangs makes the others'
collectives time out after `timeout_s`. Waiting while rank 0 alone evaluates
or saves (`barrier`) uses a separate Gloo group with the longer
`wait_timeout_s`, so a long dev evaluation is not mistaken for a hang. On top
of that, torchrun stops every worker as soon as one fails, and mpirun aborts
the job when a rank exits non-zero.
"""
import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from torch.nn.parallel import DistributedDataParallel

from utils.errors import UserError

DEFAULT_TIMEOUT_S = 300.0          # training collectives: a hung peer is noticed after this
DEFAULT_WAIT_TIMEOUT_S = 4 * 3600.0  # waiting for rank 0's evaluation / checkpointing
DEFAULT_MASTER_PORT = 29500        # torchrun's default; used for single-machine mpirun

LAUNCH_HELP = ("launch it with torchrun, e.g. `torchrun --nproc_per_node 2 "
               "gpt2_train_main.py --do_train --distributed`, or with OpenMPI, e.g. "
               "`mpirun -np 2 python gpt2_train_main.py --do_train --distributed`; "
               "drop --distributed to train in one process")


class PeerFailureError(UserError):
    """Another rank died, hung past the timeout, or could not be reached."""


@dataclass
class DistContext:
    """Where this process sits in the job. `enabled` is False for one plain process."""
    enabled: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: Optional[str] = None    # "nccl" / "gloo" when enabled
    launcher: Optional[str] = None   # "torchrun" / "mpirun" when enabled
    wait_group: Any = field(default=None, repr=False)  # Gloo group for barrier()

    def print(self, *args, **kwargs) -> None:
        """print() on rank 0 only, flushed (launchers pipe output, which Python buffers)."""
        if self.is_main:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)


# ---------------------------------------------------------------- launch environment

@dataclass
class LaunchInfo:
    """Rank layout and rendezvous point read from a launcher's environment."""
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _env_int(env, name: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; "
                        f"{LAUNCH_HELP}") from None


def _port(value, source: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 0 < port < 65536:
        raise UserError(f"{source}={value!r} is not a TCP port: set it to a free port "
                        f"between 1 and 65535 on the rank-0 machine, e.g. 29500")
    return port


def launch_info(env=None, master_addr: Optional[str] = None,
                master_port: Optional[int] = None) -> LaunchInfo:
    """Read torchrun's or OpenMPI's variables from `env` (default os.environ).

    Under mpirun, explicit `master_addr` / `master_port` (command-line flags)
    win over MASTER_ADDR / MASTER_PORT; under torchrun its own variables are
    used (its agent serves the rendezvous). Raises UserError naming what to set.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun"
        rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        launcher = "mpirun"
        rank = _env_int(env, "OMPI_COMM_WORLD_RANK")
        world = _env_int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = (_env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
                      if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0)
        local_size = (_env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
                      if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None)
        all_local = local_size == world
    else:
        raise UserError("--distributed needs a launcher that starts one process per "
                        "GPU (or CPU worker), but neither torchrun's RANK/WORLD_SIZE "
                        f"nor OpenMPI's OMPI_COMM_WORLD_RANK/SIZE is set: {LAUNCH_HELP}")
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise UserError(f"{launcher} gave rank {rank}, world size {world}, local rank "
                        f"{local_rank}, which is inconsistent: relaunch the job")

    if launcher == "torchrun":
        # torchrun's agent serves the store at its MASTER_ADDR:MASTER_PORT; flags
        # cannot move it, so its environment wins.
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing:
            raise UserError(f"RANK/WORLD_SIZE are set but {' and '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not: start the job "
                            f"with torchrun, which sets all of them, or export "
                            f"MASTER_ADDR=<rank-0 host> MASTER_PORT=<free port>")
        return LaunchInfo(launcher, rank, world, local_rank, env["MASTER_ADDR"],
                          _port(env["MASTER_PORT"], "MASTER_PORT"))

    addr = master_addr or env.get("MASTER_ADDR") or ("127.0.0.1" if all_local else None)
    if master_port is not None:
        port = _port(master_port, "--master_port")
    elif env.get("MASTER_PORT"):
        port = _port(env["MASTER_PORT"], "MASTER_PORT")
    elif all_local:
        port = DEFAULT_MASTER_PORT
    else:
        port = None
    if not addr or port is None:
        missing = " and ".join(
            what for what, ok in (("the address of the rank-0 machine", addr),
                                  ("a free TCP port on it", port is not None)) if not ok)
        raise UserError(
            f"{launcher} runs the {world} ranks on several machines, so --distributed "
            f"needs {missing}: pass --master_addr=<rank-0 host> --master_port=29500, "
            f"or export them to every rank with "
            f"`mpirun -x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=29500 ...`")
    return LaunchInfo(launcher, rank, world, local_rank, addr, port)


def _check_not_launched(env=None) -> None:
    """A launcher started several processes but --distributed is off: refuse.

    Otherwise every process would train the whole data alone and all of them
    would write the same checkpoint files.
    """
    env = os.environ if env is None else env
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = env.get(name, "1")
        if value.isdigit() and int(value) > 1:
            raise UserError(f"this process is one of {value} started by a launcher "
                            f"({name}={value}) but --distributed is not set: add "
                            f"--distributed, or run a single `python gpt2_train_main.py` "
                            f"without torchrun/mpirun")


# ---------------------------------------------------------------- set-up / tear-down

def _init_method(addr: str, port: int) -> str:
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
    return f"tcp://{host}:{port}"


def init_distributed(enabled: bool, *, master_addr: Optional[str] = None,
                     master_port: Optional[int] = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S,
                     wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
                     backend: Optional[str] = None,
                     device: Optional[torch.device] = None) -> DistContext:
    """Join the job's process group (enabled) or describe a single process.

    `timeout_s` bounds every training collective and the initial rendezvous;
    `wait_timeout_s` bounds `barrier` (ranks waiting for rank 0's evaluation
    or checkpoint). `backend` forces "gloo" or "nccl"; by default NCCL when
    CUDA is available, Gloo otherwise. `device` is the single process's
    device (default: CUDA when available, else CPU); ranks use their local GPU.
    """
    if not enabled:
        _check_not_launched()
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistContext(False, 0, 1, 0, device, True)

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: install a build "
                        "with distributed support, or drop --distributed")
    info = launch_info(master_addr=master_addr, master_port=master_port)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available() or not dist.is_nccl_available():
            raise UserError("the NCCL backend needs CUDA GPUs and an NCCL-enabled "
                            "PyTorch: use backend gloo on CPU")
        n_gpus = torch.cuda.device_count()
        if info.local_rank >= n_gpus:
            raise UserError(f"local rank {info.local_rank} has no GPU of its own "
                            f"(this machine shows {n_gpus}): start at most {n_gpus} "
                            f"processes per machine (--nproc_per_node / mpirun -H host:N)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        device = torch.device("cpu")
    else:
        raise UserError(f"unknown distributed backend {backend!r}: use nccl or gloo")

    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT (env://);
    # under mpirun rank 0 serves one at the given address (tcp://).
    init_method = "env://" if info.launcher == "torchrun" else _init_method(
        info.master_addr, info.master_port)
    kwargs = dict(backend=backend, init_method=init_method, rank=info.rank,
                  world_size=info.world_size, timeout=timeout)
    if backend == "nccl" and "device_id" in inspect.signature(
            dist.init_process_group).parameters:
        kwargs["device_id"] = device  # binds the communicator to this rank's GPU (torch>=2.3)
    try:
        dist.init_process_group(**kwargs)
    except Exception as err:  # noqa: BLE001 - every rendezvous failure gets one message
        raise PeerFailureError(
            f"rank {info.rank} of {info.world_size} could not join the process group at "
            f"{info.master_addr}:{info.master_port} within {timeout_s:g} s "
            f"({_first_line(err)}): check that all {info.world_size} ranks were started, "
            f"that the address is the rank-0 machine and reachable from every machine, "
            f"and that the port is free (set MASTER_PORT / --master_port)") from err
    try:
        wait_group = dist.new_group(backend="gloo",
                                    timeout=datetime.timedelta(seconds=wait_timeout_s))
    except Exception as err:  # noqa: BLE001
        _destroy()
        raise PeerFailureError(f"rank {info.rank}: setting up the wait group failed "
                               f"({_first_line(err)}): check the other ranks' logs") from err
    return DistContext(True, info.rank, info.world_size, info.local_rank, device,
                       info.rank == 0, backend, info.launcher, wait_group)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group. Safe to call twice, and for a single process."""
    if ctx.enabled:
        _destroy()
        ctx.wait_group = None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


# Gloo reports a lost peer as a plain RuntimeError; NCCL and the store raise
# torch.distributed.DistError subclasses.
_PEER_MARKERS = ("connection reset", "connection closed", "connection refused",
                 "broken pipe", "timed out", "gloo/transport")


def _is_peer_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and any(
        m in str(err).lower() for m in _PEER_MARKERS)


@contextlib.contextmanager
def peer_failure_guard(ctx: DistContext):
    """Turn a collective failing because of another rank into PeerFailureError.

    Wrap the training loop (DDP's gradient all-reduce runs inside backward()).
    The process group is destroyed first: a process that exits with a failed
    Gloo/NCCL operation still pending can otherwise abort during interpreter
    shutdown instead of exiting with the message.
    """
    if not ctx.enabled:
        yield
        return
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a peer failure
        if not _is_peer_failure(err) or isinstance(err, UserError):
            raise
        _destroy()
        raise PeerFailureError(
            f"rank {ctx.rank} of {ctx.world_size}: another rank stopped responding "
            f"({_first_line(err)}); it probably died or hung - see its log for the cause. "
            f"Resume from the last checkpoint once it is fixed") from err


# ---------------------------------------------------------------- model

def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around `model` (already on ctx.device) when enabled.

    DDP copies rank 0's parameters to every rank here, and then averages the
    gradients over ranks in backward().
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    with peer_failure_guard(ctx):
        return DistributedDataParallel(model, device_ids=device_ids)


def maybe_no_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the gradient all-reduce
    unless `sync` (the last micro-batch of a gradient-accumulation step)."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def global_batch_size(per_rank_batch: int, ctx: DistContext,
                      accumulation_steps: int = 1) -> int:
    """Examples per optimizer step over all ranks."""
    return per_rank_batch * ctx.world_size * accumulation_steps


def describe(ctx: DistContext, per_rank_batch: int, accumulation_steps: int = 1) -> str:
    """One log line stating the layout and the global batch."""
    total = global_batch_size(per_rank_batch, ctx, accumulation_steps)
    if not ctx.enabled:
        return (f"single process on {ctx.device}: global batch = batch {per_rank_batch} "
                f"x accumulation {accumulation_steps} = {total}")
    return (f"data-parallel via {ctx.launcher}: {ctx.world_size} ranks ({ctx.backend}); "
            f"global batch = per-rank batch {per_rank_batch} x world size "
            f"{ctx.world_size} x accumulation {accumulation_steps} = {total}")


# ---------------------------------------------------------------- collectives

def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it; identity for one process."""
    if not ctx.enabled:
        return tensor
    with peer_failure_guard(ctx):
        if ctx.backend == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(ctx.device)
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (bounded by wait_timeout_s)."""
    if not ctx.enabled:
        return
    with peer_failure_guard(ctx):
        dist.barrier(group=ctx.wait_group)
