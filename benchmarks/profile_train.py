"""Where a training step's time goes: torch.profiler over our trainer's step.

GPT-2 117M (random, no dropout), AdamW as bench_train.py, one warm-up step and
then `--steps` profiled steps per shape. The operators' own CPU time is summed
into the parts of a step (matrix products, attention, the loss over 50,257
logits, the optimizer, ...) and printed as shares, for the attention this
project runs ("fused") and texar's original ("texar"):

    python benchmarks/profile_train.py                       # 4 x 128 and 1 x 1024
    python benchmarks/profile_train.py --shapes 1x1024 --attention texar
"""
import argparse
import os
import sys
import tempfile
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

# Operator name fragments -> the part of the step they belong to (first match wins).
PARTS = (
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss", "cross_entropy",
                                 "logsumexp", "crossentropysum")),
    ("layer norm", ("layer_norm",)),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention",
                   "_softmax", "baddbmm", "bmm")),
    ("optimizer and clipping", ("adam", "_foreach", "linalg_vector_norm", "clip")),
    ("matrix products", ("addmm", "aten::mm", "matmul", "linear")),
    ("GELU and element-wise", ("tanh", "pow", "aten::mul", "aten::add", "aten::div",
                               "gelu", "aten::sub", "aten::exp", "dropout", "aten::sum")),
    ("embedding", ("embedding",)),
    ("copies, fills and layout", ("copy_", "clone", "contiguous", "cat", "fill_", "zero_",
                                  "empty", "to_copy", "index", "gather", "scatter")),
)


def part_of(name):
    lowered = name.lower()
    for part, fragments in PARTS:
        if any(f in lowered for f in fragments):
            return part
    return "other"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x128,1x1024", help="BATCHxTOKENS, comma-separated.")
    p.add_argument("--attention", default="fused,texar")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=8, help="Also list the N costliest operators.")
    return p.parse_args()


def profile(shape, attention, args):
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile
    import bench_train
    from utils.training.trainer import LossWindow
    batch, length = shape
    bench_train.SHAPES["profile"] = shape
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as out:
        batches = bench_train.make_data("profile", data_dir)
        run_args = argparse.Namespace(precision="fp32", compile=False)
        trainer = bench_train.build_ours(run_args, device, data_dir, out, "profile", attention)
        window = LossWindow(device)
        trainer._train_step([batches[0]], window)  # warm-up: optimizer state, caches
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(args.steps):
                trainer._train_step([batches[(step + 1) % len(batches)]], window)
    totals, by_op = {}, {}
    for event in prof.key_averages():
        part = part_of(event.key)
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total
        by_op[event.key] = event.self_cpu_time_total
    return totals, by_op


def main():
    args = parse_args()
    warnings.simplefilter("ignore")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"GPT-2 117M training step profile, CPU fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; operators' self CPU time per step")
    for text in args.shapes.split(","):
        shape = tuple(int(n) for n in text.split("x"))
        for attention in args.attention.split(","):
            totals, by_op = profile(shape, attention, args)
            whole = sum(totals.values())
            print(f"\n{shape[0]} x {shape[1]} tokens, attention = {attention!r}: "
                  f"{whole / 1e6 / args.steps:.2f} s of operator time per step")
            for part, micros in sorted(totals.items(), key=lambda kv: -kv[1]):
                print(f"  {part:<26} {micros / 1e6 / args.steps:7.2f} s  "
                      f"{100 * micros / whole:5.1f}%")
            print("  costliest operators:")
            for name, micros in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"    {name:<44} {micros / 1e6 / args.steps:7.2f} s")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
