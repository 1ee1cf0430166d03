"""Whole commands, start to exit: ours against CTranslate2, float32 and int8.

What a user times is the whole process: imports, reading and checking the
weights, building the engine, generating, printing. Each run here is a fresh
process on random GPT-2 124M weights (seeded), in OpenAI's layout for ours
(written by convert_checkpoint.py, as downloaded models are) and converted by
CTranslate2's own converter for it:
  ours      python gpt2_generate_main.py --pretrain_model_dir DIR --prompt P
                --decoding_strategy greedy --max_decoding_length L [--dtype int8]
            (--compile auto: the compiled step's kernels are stored before the
            rounds, as after a user's first compiled run, so auto loads them
            for runs of 128 tokens or more, except on Intel CPUs)
  ours_compiled  the same with --compile on (the stored kernels on any CPU)
  ct2       python benchmarks/ct2_engine.py --stream CT2_DIR L [int8]
            (imports ctranslate2 and our tokenizer, loads, streams greedily)
  torch     python -c "import torch" (the floor every torch program pays)
For 1 new token (start-up: the time to the first token, as the process
prints it and exits) and for 200 new tokens. Peak RSS is the process's own
high-water mark (os.wait4's ru_maxrss). Runs are alternated: each round runs
every engine once per length, in a rotating order; the table shows medians
over rounds, and each "x ct2" is the median of the per-round ratios against
CTranslate2 of the same precision, so load from other users of a shared
machine falls on both sides alike.

    python benchmarks/bench_startup.py                 # 5 rounds
    python benchmarks/bench_startup.py --rounds 3 --work_dir /tmp/startup
    python benchmarks/bench_startup.py --config_model configs.config_model_1558M \
        --engines ours,ours_int8 --new_tokens 1 --rounds 1 --work_dir /tmp/startup_1558M
The model files and the compiled step's kernels (in --work_dir/kernel_store,
through GPT2_TEXAR_CACHE_DIR) are written once into --work_dir (kept, and reused
when there).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from benchmarks import ct2_engine  # noqa: E402

SEED = 1234
PROMPT = "The quick brown fox jumps over the lazy dog."
ENGINES = ("ours", "ours_compiled", "ours_int8", "ct2", "ct2_int8")


def model_dirs(work_dir: str):
    """(OpenAI dir, Hugging Face dir, CTranslate2 dir) inside work_dir."""
    return tuple(os.path.join(work_dir, name) for name in ("openai", "hf", "ct2"))


def our_environment(work_dir: str) -> dict:
    """The environment of our commands: the compiled step's kernel store in
    work_dir (utils/decoding/kernel_store.py), not the user's cache."""
    from utils.decoding.kernel_store import CACHE_ENV
    return {**os.environ, CACHE_ENV: os.path.join(work_dir, "kernel_store")}


def prepare_models(work_dir: str, config: str, with_ct2: bool = True,
                   with_kernels: bool = True):
    """Write one random model into model_dirs(work_dir) once: OpenAI's layout,
    and CTranslate2's (through Hugging Face's) when `with_ct2`; with
    `with_kernels`, build the compiled step's kernels for it (a float32 run
    with --compile on)."""
    import torch
    from utils.checkpoints.weights import (CHECKPOINT_FORMAT, checkpoint_model_fields,
                                           save_checkpoint)
    from utils.model import build_model, load_model_hparams
    openai_dir, hf_dir, ct2_dir = model_dirs(work_dir)
    ckpt = os.path.join(work_dir, "random.ckpt")
    if not os.path.isdir(openai_dir):
        torch.manual_seed(SEED)
        hparams = load_model_hparams(config)
        model = build_model(hparams)
        save_checkpoint(ckpt, {"model": model.state_dict(), "format": CHECKPOINT_FORMAT,
                               **checkpoint_model_fields(hparams)})
        del model
        _run_checked([sys.executable, "convert_checkpoint.py", ckpt, openai_dir,
                      "--format", "openai"])
    if with_kernels:
        _run_checked(command("ours_compiled", openai_dir, ct2_dir, prompt_tokens() + 2),
                     env=our_environment(work_dir))
    if with_ct2 and ct2_engine.available() and not os.path.isdir(ct2_dir):
        if not os.path.isdir(hf_dir):
            _run_checked([sys.executable, "convert_checkpoint.py", openai_dir, hf_dir,
                          "--format", "hf"])
        import ctranslate2
        ctranslate2.converters.TransformersConverter(hf_dir).convert(ct2_dir, force=True)


def _run_checked(cmd, env=None) -> None:
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, env=env)


def prompt_tokens() -> int:
    from utils.processor import get_encoder
    return len(get_encoder().encode(PROMPT))


def command(engine: str, openai_dir: str, ct2_dir: str, max_length: int):
    if engine == "torch":
        return [sys.executable, "-c", "import torch"]
    if engine.startswith("ours"):
        cmd = [sys.executable, "gpt2_generate_main.py", "--pretrain_model_dir", openai_dir,
               "--prompt", PROMPT, "--decoding_strategy", "greedy",
               "--max_decoding_length", str(max_length)]
        extra = {"ours_int8": ["--dtype", "int8"], "ours_compiled": ["--compile", "on"]}
        return cmd + extra.get(engine, [])
    compute = ct2_engine.COMPUTE_TYPES[engine]
    return [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "ct2_engine.py"),
            "--stream", ct2_dir, str(max_length), compute]


def run_once(cmd, env):
    """(seconds, peak RSS in MiB) of one whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stdin.write((PROMPT + "\n").encode())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}...: {err.strip().splitlines()[-1:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=200)
    parser.add_argument("--config_model", default="configs.config_model_117M")
    parser.add_argument("--work_dir", default=None,
                        help="Where the model files are written (default: a temporary one).")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--prepare_only", action="store_true",
                        help="Write the model files into --work_dir and exit.")
    args = parser.parse_args()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_startup_")
    os.makedirs(work_dir, exist_ok=True)
    engines = [e for e in args.engines.split(",")
               if e.startswith("ours") or ct2_engine.available()]
    with_ct2 = any(e.startswith("ct2") for e in engines)
    if args.prepare_only:
        prepare_models(work_dir, args.config_model, with_ct2,
                       with_kernels=bool({"ours", "ours_compiled"} & set(engines)))
        return
    # In a process of its own: Linux carries a parent's peak RSS into every
    # process it starts (fork copies it, exec keeps it), so this process must
    # never hold a model, or every ru_maxrss below would be at least its peak.
    _run_checked([sys.executable, os.path.abspath(__file__), "--prepare_only",
                  "--work_dir", work_dir, "--config_model", args.config_model,
                  "--engines", ",".join(engines)])
    openai_dir, _, ct2_dir = model_dirs(work_dir)
    env = our_environment(work_dir)
    base = prompt_tokens()
    lengths = {1: base + 1, args.new_tokens: base + args.new_tokens}
    runs = {}  # (engine, new tokens) -> [(seconds, MiB)] per round
    for round_no in range(args.rounds):
        order = engines[round_no % len(engines):] + engines[:round_no % len(engines)]
        for new, length in lengths.items():
            for engine in order + ["torch"]:
                if engine == "torch" and new != 1:
                    continue
                result = run_once(command(engine, openai_dir, ct2_dir, length), env)
                runs.setdefault((engine, new), []).append(result)
                print(f"round {round_no + 1} {engine:9s} {new:4d} new: {result[0]:6.2f} s "
                      f"{result[1]:7.0f} MiB", file=sys.stderr, flush=True)
    print_table(runs, engines, list(lengths))


def _ratio(runs, engine, other, new, field):
    return statistics.median(a[field] / b[field]
                             for a, b in zip(runs[(engine, new)], runs[(other, new)]))


def print_table(runs, engines, news) -> None:
    torch_s = statistics.median(s for s, _ in runs[("torch", 1)])
    print(f"\n`python -c 'import torch'`: {torch_s:.2f} s (median)")
    print("| engine | new tokens | whole process s | x ct2 (time) | peak RSS MiB "
          "| x ct2 (RSS) | x import torch |")
    print("|---|---|---|---|---|---|---|")
    for new in news:
        for engine in engines:
            times = [s for s, _ in runs[(engine, new)]]
            rss = [m for _, m in runs[(engine, new)]]
            other = "ct2_int8" if engine.endswith("int8") else "ct2"
            vs = (f"{_ratio(runs, engine, other, new, 0):.2f}",
                  f"{_ratio(runs, engine, other, new, 1):.2f}") \
                if (other, new) in runs and engine != other else ("", "")
            floor = f"{_ratio(runs, engine, 'torch', 1, 0):.2f}" if new == 1 else ""
            print(f"| {engine} | {new} | {statistics.median(times):.2f} | {vs[0]} | "
                  f"{statistics.median(rss):.0f} | {vs[1]} | {floor} |")


if __name__ == "__main__":
    main()
