"""What moving the weights into huge pages (utils/decoding/weight_arena.py) gains.

Two copies of the same random GPT-2 124M weights in one process: one frozen,
so the engine packs it into a huge-page block in reading order, one that
requires grad, so its weights stay where torch put them (4 KiB pages) and
Q/K/V are a fused copy, as before packing. Greedy decoding, batch 1,
alternating the two copies run by run so that other load on a shared machine
hits both alike; prints each one's median tok/s, the median of the paired
ratios, and whether both produced the same ids.

    python benchmarks/bench_arena.py [--prompt_lengths 8,200] [--new_tokens 100] [--rounds 8]
"""
import argparse
import copy
import os
import statistics
import sys
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt_lengths", default="8,200")
    parser.add_argument("--new_tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch
    from benchmarks.bench_generate import NEVER, build_texar, prompts
    from utils.decoding import weight_arena
    from utils.decoding.generation import generate
    from utils.decoding.engine import engine_for, prepare_for_decoding

    torch.set_num_threads(args.threads)
    packed = build_texar("cpu")  # frozen
    plain = copy.deepcopy(packed).requires_grad_(True)
    prepare_for_decoding(packed), engine_for(plain)
    print(f"huge pages available: {weight_arena.huge_pages_available()}; "
          f"{args.threads} threads, {args.new_tokens} new tokens, greedy, batch 1, "
          f"{args.rounds} alternating rounds")
    for length in [int(n) for n in args.prompt_lengths.split(",")]:
        context = prompts(1, length).tolist()

        def run(model):
            start = time.perf_counter()
            ids = generate(model, context, length + args.new_tokens,
                           strategy="greedy", end_token=NEVER)
            return args.new_tokens / (time.perf_counter() - start), ids

        run(packed), run(plain)  # warm-up
        rates = {"packed": [], "plain": []}
        same = True
        for i in range(args.rounds):
            order = (("packed", packed), ("plain", plain))
            results = {}
            for name, model in (order if i % 2 == 0 else order[::-1]):
                results[name] = run(model)
                rates[name].append(results[name][0])
            same &= results["packed"][1] == results["plain"][1]
        ratio = statistics.median(a / b for a, b in zip(rates["packed"], rates["plain"]))
        print(f"prompt {length:4d}: packed {statistics.median(rates['packed']):6.1f} tok/s, "
              f"4 KiB pages {statistics.median(rates['plain']):6.1f} tok/s, "
              f"paired ratio {ratio:.3f}, same ids {'yes' if same else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
