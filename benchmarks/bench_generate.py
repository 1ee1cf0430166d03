"""Benchmark GPT-2 generation: this project's engine against the alternatives.

Engines, all on the same random GPT-2 124M weights (configs.config_model_117M):
  ours  - utils.generation.generate (prefill + preallocated KV cache)
  hf    - Hugging Face transformers' GPT2LMHeadModel.generate(use_cache=True),
          with the texar weights copied in (skipped if transformers is absent)
  texar - texar's built-in decoding, model(decoding_strategy='infer_greedy',
          context=...), what the original example used
  ours_int8 - ours with 8-bit linear layers (utils/int8_linear.py, --dtype int8)
  ct2, ct2_int8 - CTranslate2 (pip install ctranslate2) float32 and int8, the
          same weights through its own Hugging Face converter
          (benchmarks/ct2_engine.py; skipped if ctranslate2 is absent)

Every case decodes greedily with an end token that cannot occur, so every
engine produces exactly --new_tokens tokens per row. Each (engine, case) runs
in its own subprocess so its peak memory is its own: peak = the process's
resident-set high-water mark while generating (warm-up included; reset through
/proc/self/clear_refs once the model is built) minus the resident set at that
point; on CUDA, torch.cuda.max_memory_allocated minus memory_allocated. Time to first token (TTFT) is a separate
run with one new token; tok/s counts all rows' new tokens over the whole run.

Ceiling: batch-1 decoding reads every weight once per token, so tokens/s can
be at most (memory bandwidth) / (bytes of weights + KV cache read per token).
The bandwidth is measured in the same run (sum over a 1 GiB tensor, same
thread count); "%ceil" is the decode rate (after the first token) against
that ceiling.

--cli also times the path users run (benchmarks/cli_timing.py): the whole
process of `gpt2_generate_main.py --is_interactive` (streaming printer
included) for 1 and for N+1 new tokens, N / (difference) as tok/s, against the
same on CTranslate2 float32.

Run (the whole table takes minutes, mostly texar's built-in decoding):
    python benchmarks/bench_generate.py
    python benchmarks/bench_generate.py --quick           # batch 1, prompts 8 and 200
    python benchmarks/bench_generate.py --skip_texar_long # texar only on prompts <= 200
The machine may be shared: timings move with other load, so compare ratios
taken in the same run, and re-run on a quiet machine for absolute numbers.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

NEVER = -1  # an end token no engine can produce: every row runs to the end
SEED = 1234


def build_texar(device: str, dtype: str = "float32"):
    import torch
    from utils.model import build_model, load_model_hparams
    torch.manual_seed(SEED)  # every subprocess builds the same weights
    model = build_model(load_model_hparams("configs.config_model_117M"))
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def hf_from_texar(model):
    """GPT2LMHeadModel holding a copy of a texar GPT2Decoder's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from utils.hf_format import hf_gpt2_config, texar_to_hf_state_dict
    from utils.model import model_size
    sizes = model_size(model.hparams.todict())
    hf = GPT2LMHeadModel(GPT2Config(**hf_gpt2_config(sizes)))
    hf.load_state_dict(texar_to_hf_state_dict(model.state_dict(), sizes["n_layer"]))
    return hf.eval()


def prompts(batch: int, length: int):
    import torch
    g = torch.Generator().manual_seed(SEED + length)
    return torch.randint(0, 50256, (batch, length), generator=g)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak(device: str) -> int:
    """Start measuring peak memory now; returns the baseline in bytes."""
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    return _rss_kib("VmRSS") * 1024


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM") * 1024


def run_case(engine: str, batch: int, length: int, new_tokens: int, device: str,
             threads: int, repeats: int, dtype: str, ct2_dir: str = None,
             prompt_ids: list = None) -> dict:
    """Time one engine on one case (runs inside the child process)."""
    warnings.simplefilter("ignore")
    if engine.startswith("ct2"):  # torch-free: see benchmarks/ct2_engine.py
        from benchmarks import ct2_engine
        generator = ct2_engine.load_generator(ct2_dir, engine, threads)
        tokens = ct2_engine.id_tokens(prompt_ids)
        return time_decoding(engine, batch, length, new_tokens, device, repeats,
                             lambda n: ct2_engine.greedy(generator, tokens, n))
    import torch
    torch.set_num_threads(threads)
    ids = torch.tensor(prompt_ids, device=device)
    model = build_texar(device, dtype)

    if engine in ("ours", "ours_int8"):
        from utils.generation import generate
        contexts = ids.tolist()
        if engine == "ours_int8":
            from utils.int8_linear import quantize_for_decoding
            quantize_for_decoding(model)
        from utils.gpt2_net import engine_for
        prepared = engine_for(model).extra_bytes()  # built now, outside the peak

        def decode(n):
            return generate(model, contexts, length + n, strategy="greedy",
                            end_token=NEVER)
    elif engine == "hf":
        hf = hf_from_texar(model.float()).to(device=device, dtype=getattr(torch, dtype))
        del model
        hf.generation_config.eos_token_id = None  # never stop early
        hf.generation_config.pad_token_id = 0
        mask = torch.ones_like(ids)

        def decode(n):
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n,
                                  do_sample=False, use_cache=True)
            return out[:, length:].tolist()
    elif engine == "texar":
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)

        def decode(n):
            with torch.no_grad():
                # texar returns max_decoding_length + 1 tokens, context included.
                out, _ = model(decoding_strategy="infer_greedy", context=ids,
                               context_sequence_length=lengths,
                               max_decoding_length=length + n - 1, end_token=NEVER)
            return out.sample_id[:, length:].tolist()
    else:
        raise ValueError(engine)
    result = time_decoding(engine, batch, length, new_tokens, device, repeats, decode)
    if engine.startswith("ours"):
        result["prepared_bytes"] = prepared
    return result


def time_decoding(engine: str, batch: int, length: int, new_tokens: int, device: str,
                  repeats: int, decode) -> dict:
    """Warm up, then time decode(1) (TTFT) and decode(new_tokens)."""
    def sync():
        if device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()

    def timed(n):
        sync()
        start = time.perf_counter()
        result = decode(n)
        sync()
        return time.perf_counter() - start, result

    # Peak memory counts from before the warm-up, so one-time allocations
    # (allocator growth, library workspaces) are included for every engine.
    base = _reset_peak(device)
    decode(2)  # warm-up: first-call allocations and kernel selection
    ttfts, totals = [], []
    for _ in range(repeats):
        ttfts.append(timed(1)[0])
        seconds, tokens = timed(new_tokens)
        totals.append(seconds)
    peak = _peak(device) - base
    assert all(len(row) == new_tokens for row in tokens), "early stop"
    ttft, seconds = statistics.median(ttfts), statistics.median(totals)
    return {"engine": engine, "batch": batch, "prompt": length, "total": length + new_tokens,
            "ttft": ttft, "seconds": seconds,
            "tok_s": batch * new_tokens / seconds,
            "decode_tok_s": batch * (new_tokens - 1) / max(seconds - ttft, 1e-9),
            "peak_bytes": peak, "first_row": tokens[0]}


def measure_bandwidth(threads: int, device: str) -> float:
    """Achievable read bandwidth in bytes/s: best of 5 sums over 1 GiB."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(256 * 1024 * 1024, device=device)  # touched, so really in memory
    best = float("inf")
    for _ in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def bytes_per_token(batch: int, prompt: int, new_tokens: int, itemsize: int = 4) -> float:
    """Bytes one decoding step reads: weights once, plus every row's KV cache."""
    from utils.model import load_model_hparams, model_size
    s = model_size(load_model_hparams("configs.config_model_117M"))
    d, v, layers = s["n_embd"], s["n_vocab"], s["n_layer"]
    weights = v * d + layers * (12 * d * d + 13 * d) + 2 * d  # wte (=output) + blocks + final LN
    mean_len = prompt + new_tokens / 2
    kv = batch * layers * 2 * mean_len * d
    return float(itemsize) * (weights + kv)


def child_main(spec: str) -> None:
    args = json.loads(spec)
    print("RESULT " + json.dumps(run_case(**args)), flush=True)


def run_in_child(**kwargs) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}", **kwargs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--prompt_lengths", default="8,200,512")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--engines", default="ours,ours_int8,ct2,ct2_int8,hf,texar")
    parser.add_argument("--texar_max_prompt", type=int, default=None,
                        help="run texar's built-in decoding only on prompts up to this length")
    parser.add_argument("--skip_texar_long", action="store_true",
                        help="same as --texar_max_prompt 200")
    parser.add_argument("--texar_max_batch", type=int, default=None,
                        help="run texar's built-in decoding only up to this batch size")
    parser.add_argument("--quick", action="store_true",
                        help="batch 1, prompts 8 and 200, texar on the 8-token prompt only")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per case (the median is reported)")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="weights and activations of every engine (default float32)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cli", action="store_true",
                        help="also time gpt2_generate_main.py against CTranslate2's "
                             "streaming generator, whole process (CPU, float32)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    texar_max_prompt, texar_max_batch = args.texar_max_prompt, args.texar_max_batch
    if args.skip_texar_long:
        texar_max_prompt = 200
    if args.quick:
        batches, lengths, texar_max_prompt = [1], [8, 200], 8
    engines = args.engines.split(",")
    if "hf" in engines:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed: skipping the hf engine "
                  "(pip install -r requirements-bench.txt)")
            engines.remove("hf")
    from benchmarks import ct2_engine
    ct2_dir = hf_dir = None
    if any(e.startswith("ct2") for e in engines) or args.cli:
        if not ct2_engine.available() or device != "cpu":
            print("ctranslate2 (or transformers) is not installed, or not on CPU: "
                  "skipping the ct2 engines (pip install -r requirements-bench.txt)")
            engines = [e for e in engines if not e.startswith("ct2")]
            args.cli = False
        else:
            workdir = tempfile.mkdtemp(prefix="bench_generate_")
            hf_dir, ct2_dir = ct2_engine.write_model_dirs(build_texar("cpu"), workdir)
    if device != "cpu" and "ours_int8" in engines:
        engines.remove("ours_int8")  # a CPU path

    bandwidth = measure_bandwidth(args.threads, device)
    print(f"device {device}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.dtype}, measured bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{args.new_tokens} new tokens, "
          f"greedy, median of {args.repeats}")
    results = []
    for batch in batches:
        for length in lengths:
            for engine in engines:
                if engine == "texar" and (
                        (texar_max_prompt is not None and length > texar_max_prompt)
                        or (texar_max_batch is not None and batch > texar_max_batch)):
                    continue
                r = run_in_child(engine=engine, batch=batch, length=length,
                                 new_tokens=args.new_tokens, device=device,
                                 threads=args.threads, repeats=args.repeats,
                                 dtype=args.dtype, ct2_dir=ct2_dir,
                                 prompt_ids=prompts(batch, length).tolist())
                results.append(r)
                if "error" in r:
                    print(f"  {engine} batch {batch} prompt {length}: FAILED {r['error']}")
                else:
                    print(f"  {engine:9s} batch {batch:2d} prompt {length:3d}: "
                          f"{r['tok_s']:7.1f} tok/s, TTFT {r['ttft'] * 1000:7.1f} ms",
                          flush=True)
    print_table(results, bandwidth, args.new_tokens, getattr(torch, args.dtype).itemsize)
    cli_results = []
    if args.cli:
        from benchmarks.cli_timing import time_cli_paths
        cli_results = time_cli_paths(hf_dir, ct2_dir, lengths, args.new_tokens,
                                     args.repeats)
    if ct2_dir is not None:
        shutil.rmtree(os.path.dirname(ct2_dir), ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "threads": args.threads, "device": device,
                       "dtype": args.dtype,
                       "results": results, "cli": cli_results}, f, indent=1)


def print_table(results, bandwidth: float, new_tokens: int, itemsize: int) -> None:
    ok = [r for r in results if "error" not in r]
    by_case = {}
    for r in ok:
        by_case.setdefault((r["batch"], r["prompt"]), {})[r["engine"]] = r
    header = (f"{'batch':>5} {'prompt':>6} {'engine':>9} {'tok/s':>8} {'TTFT ms':>8} "
              f"{'peak MiB':>8} {'%ceil':>6} {'x texar':>8} {'x hf':>6} {'x ct2':>6} "
              f"{'x ct2i8':>7} {'same ids':>8} {'prep MiB':>8}")
    print()
    print(header)
    print("-" * len(header))
    for (batch, prompt), engines in sorted(by_case.items()):
        ceiling = batch * bandwidth / bytes_per_token(batch, prompt, new_tokens, itemsize)
        ref_ids = engines.get("hf", engines.get("texar", engines.get("ct2", {}))).get(
            "first_row")
        for name in ("ours", "ours_int8", "ct2", "ct2_int8", "hf", "texar"):
            r = engines.get(name)
            if r is None:
                continue
            vs = {k: (f"{r['tok_s'] / engines[k]['tok_s']:.2f}" if k in engines else "-")
                  for k in ("texar", "hf", "ct2", "ct2_int8")}
            same = "-" if ref_ids is None else ("yes" if r["first_row"] == ref_ids else "NO")
            if name.endswith("int8") and same == "NO":
                same = "no (8-bit)"  # int8 is not expected to match exactly
            # The ceiling counts float32 weight bytes: not the int8 engines'.
            ceil = ("     -" if name.endswith("int8")
                    else f"{100 * r['decode_tok_s'] / ceiling:5.0f}%")
            print(f"{batch:>5} {prompt:>6} {name:>9} {r['tok_s']:8.1f} "
                  f"{r['ttft'] * 1000:8.1f} {r['peak_bytes'] / 2**20:8.0f} "
                  f"{ceil} {vs['texar']:>8} "
                  f"{vs['hf']:>6} {vs['ct2']:>6} {vs['ct2_int8']:>7} {same:>8} "
                  f"{r.get('prepared_bytes', 0) / 2**20:8.0f}")
    print("\nprep MiB: weight copies our engine prepares once (fused Q/K/V, int8 "
          "layers), held beside the model's own parameters; "
          "peak MiB is what generating itself adds.")
    print("%ceil: decode tok/s (after the first token) / (bandwidth / bytes read per "
          "step); batch 16 on CPU is compute-bound, so its %ceil is low by nature.")


if __name__ == "__main__":
    main()
