"""Benchmark data-parallel training: 1 process against N processes under torchrun.

Each case runs gpt2_train_main.py for real (--do_train --from_scratch, no
evaluation) on the same prepared data, and reads the trainer's own throughput
from <output_dir>/metrics.jsonl: global target tokens per second over all
ranks, measured on rank 0 between log lines (evaluation and saving excluded).
The first log window (warm-up: allocation, first DDP all-reduce) is dropped.

Cases (B = --batch):
  1 proc     one process, batch B, every core      (the baseline)
  1 proc/Tt  the same with the T threads one rank gets below (per-core reference)
  N x B/N    torchrun N ranks, per-rank batch B/N  (same global batch: strong scaling)
  N x B      torchrun N ranks, per-rank batch B    (N x the global batch: weak scaling)
On CPU the single process uses every core for its intra-op threads and each
of N ranks gets cores/N threads, so the comparison shares the same cores. On
GPUs each rank takes one GPU (NCCL): N must not exceed the GPUs on the machine.

Run:
    python benchmarks/bench_distributed.py                     # tiny model, toy data
    python benchmarks/bench_distributed.py --config_model configs.config_model_117M \\
        --batch 8 --steps 30
The machine may be shared: compare the ratios taken in one run. Nothing is
asserted; this only reports.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

TRAIN_CONFIG = """
data_dir = {data_dir!r}
max_seq_length = {max_seq_length}
train_batch_size = {batch}
eval_batch_size = 8
test_batch_size = 8
max_train_epoch = 1000
display_steps = {window}
eval_steps = -1
checkpoint_steps = -1
warmup_steps = 0
opt = {{"optimizer": {{"type": "AdamW", "kwargs": {{"lr": 1e-4}}}},
       "gradient_clip": {{"type": "clip_grad_norm_", "kwargs": {{"max_norm": 1.0}}}}}}
seed = 1
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_model", default="configs.config_model_tiny")
    p.add_argument("--data_dir", default=os.path.join(REPO_ROOT, "data", "toy"),
                   help="Directory with train.txt (encoded here) or a prepared train.npy.")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="Global batch of the baseline.")
    p.add_argument("--nproc", type=int, default=2, help="Ranks of the distributed cases.")
    p.add_argument("--steps", type=int, default=30, help="Optimizer steps per case.")
    p.add_argument("--window", type=int, default=5, help="Steps per throughput sample.")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepared_data(args, work: str) -> str:
    """A directory holding train.npy for --max_seq_length."""
    from utils.data.records import PreparedSplit, split_data_path
    from utils.data.prepare import prepare_split
    existing = split_data_path(args.data_dir, "train")
    if os.path.isfile(existing) and PreparedSplit(existing).max_seq_length == args.max_seq_length:
        return args.data_dir
    out = os.path.join(work, "data")
    prepare_split(os.path.join(args.data_dir, "train.txt"), split_data_path(out, "train"),
                  max_seq_length=args.max_seq_length, vocab_dir=None, progress=False)
    return out


def run_case(name, nproc, batch, args, data_dir, work, threads):
    out = os.path.join(work, name.replace(" ", "_").replace("/", "_"))
    cfg = os.path.join(work, f"cfg_{os.path.basename(out)}.py")
    with open(cfg, "w") as f:
        f.write(TRAIN_CONFIG.format(data_dir=data_dir, max_seq_length=args.max_seq_length,
                                    batch=batch, window=args.window))
    trainer = ["gpt2_train_main.py", "--do_train", "--from_scratch", "--quiet",
               "--config_model", args.config_model, "--config_train", cfg,
               "--output_dir", out, "--stop_after_steps", str(args.steps)]
    if nproc == 1:
        cmd = [sys.executable] + trainer
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max_restarts", "0"
               ] + trainer + ["--distributed"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [json.loads(line)["tokens_per_s"] for line in f
                 if json.loads(line).get("split") == "train"]
    steady = rates[1:] or rates
    return {"case": name, "ranks": nproc, "per_rank_batch": batch,
            "global_batch": nproc * batch, "threads_per_rank": threads,
            "tok_s": statistics.mean(steady), "tok_s_spread": (min(steady), max(steady)),
            "wall_s": wall}


def main():
    args = parse_args()
    import torch
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.nproc:
        sys.exit(f"{args.nproc} ranks need {args.nproc} GPUs (NCCL: one GPU per rank); "
                 f"this machine has {torch.cuda.device_count()}: pass --nproc "
                 f"{torch.cuda.device_count()} or run on CPU with CUDA_VISIBLE_DEVICES=")
    if args.batch % args.nproc:
        sys.exit(f"--batch {args.batch} must be a multiple of --nproc {args.nproc}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda
              else f"CPU, {cores} cores (Gloo)")
    print(f"device: {device}; torch {torch.__version__}; model {args.config_model}; "
          f"max_seq_length {args.max_seq_length}; {args.steps} steps per case, "
          f"throughput from steps {args.window + 1}-{args.steps}")
    n = args.nproc
    work = tempfile.mkdtemp(prefix="bench_dist_")
    try:
        data_dir = prepared_data(args, work)
        cases = [("1 proc", 1, args.batch, cores),
                 (f"1 proc/{max(1, cores // n)}t", 1, args.batch, max(1, cores // n)),
                 (f"{n} x {args.batch // n}", n, args.batch // n, max(1, cores // n)),
                 (f"{n} x {args.batch}", n, args.batch, max(1, cores // n))]
        results = [run_case(name, p, b, args, data_dir, work, t) for name, p, b, t in cases]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the alternative a user would pick: the faster single-process setting
    base = max(r["tok_s"] for r in results if r["ranks"] == 1)
    print(f"{'case':<11} {'ranks':>5} {'batch/rank':>10} {'global':>6} {'threads':>7} "
          f"{'tok/s':>9} {'(min-max)':>15} {'vs best 1':>9} {'wall s':>7}")
    for r in results:
        lo, hi = r["tok_s_spread"]
        print(f"{r['case']:<11} {r['ranks']:>5} {r['per_rank_batch']:>10} "
              f"{r['global_batch']:>6} {r['threads_per_rank']:>7} {r['tok_s']:>9,.0f} "
              f"{f'{lo:,.0f}-{hi:,.0f}':>15} {r['tok_s'] / base:>8.2f}x {r['wall_s']:>7.1f}")
    print("tok/s: global target tokens per second over all ranks (trainer's metrics.jsonl); "
          "vs best 1: against the faster single-process row; wall s: the whole command, "
          "start-up included.")


if __name__ == "__main__":
    main()
