"""Benchmark GPT-2 generation: this project's engine against the alternatives.

Engines, all on the same random GPT-2 124M weights (configs.config_model_117M):
  ours  - utils.decoding.generation.generate (prefill + preallocated KV cache); at
          batch 1 on the CPU in float32 with the compiled decoding step on
          (utils/decoding/compiled_step.py), as gpt2_generate_main.py runs it
  ours_eager - the same without the compiled step (utils/decoding/engine.py only)
  ours_onednn - ours_eager with every product through oneDNN, also the few-row
          ones that go to MKL on Intel CPUs (utils/decoding/linear.py): what
          that choice is worth on this machine
  hf    - Hugging Face transformers' GPT2LMHeadModel.generate(use_cache=True),
          with the texar weights copied in (skipped if transformers is absent)
  texar - texar's built-in decoding, model(decoding_strategy='infer_greedy',
          context=...), what the original example used
  ours_int8 - ours with 8-bit linear layers (utils/decoding/int8_linear.py, --dtype int8)
  ct2, ct2_int8 - CTranslate2 (pip install ctranslate2) float32 and int8, the
          same weights through its own Hugging Face converter
          (benchmarks/ct2_engine.py; skipped if ctranslate2 is absent)

Every case decodes greedily with an end token that cannot occur, so every
engine produces exactly --new_tokens tokens per row. Each (engine, case) has
its own worker process, so its peak memory is its own: peak = the process's
resident-set high-water mark while generating (warm-up included; reset through
/proc/self/clear_refs once the model is built) minus the resident set at that
point; on CUDA, torch.cuda.max_memory_allocated minus memory_allocated. The
workers of a case are timed interleaved: --repeats rounds, each running every
engine once in a rotating order (a pause between runs lets idle threads stop
spinning), so load from elsewhere on a shared machine falls on all of them
alike. tok/s and TTFT are medians over the rounds; "x ct2" and the other
ratios are medians of the per-round ratios. Time to first token (TTFT) is a
separate run with one new token; tok/s counts all rows' new tokens over the
whole run.

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
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    return model.requires_grad_(False)  # inference only, as gpt2_generate_main.py


def hf_from_texar(model):
    """GPT2LMHeadModel holding a copy of a texar GPT2Decoder's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from utils.checkpoints.hf_names import hf_gpt2_config, texar_to_hf_state_dict
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


def make_decoder(engine: str, batch: int, length: int, device: str, threads: int,
                 dtype: str, ct2_dir: str = None, prompt_ids: list = None):
    """(decode(n) -> n new ids per row, bytes of prepared weight copies) for
    one engine; runs inside that engine's worker process."""
    if engine.startswith("ct2"):  # torch-free: see benchmarks/ct2_engine.py
        from benchmarks import ct2_engine
        generator = ct2_engine.load_generator(ct2_dir, engine, threads)
        tokens = ct2_engine.id_tokens(prompt_ids)
        return (lambda n: ct2_engine.greedy(generator, tokens, n)), 0
    import torch
    torch.set_num_threads(threads)
    ids = torch.tensor(prompt_ids, device=device)
    model = build_texar(device, dtype)

    if engine in ("ours", "ours_eager", "ours_onednn", "ours_int8"):
        from utils.decoding.generation import generate
        if engine == "ours_onednn":  # this worker process only
            from utils.decoding import linear
            linear.onednn_min_rows = lambda device: 1
        contexts = ids.tolist()
        from utils.decoding.engine import prepare_for_decoding
        # built now, outside the peak, as gpt2_generate_main.py does
        prepared = prepare_for_decoding(model, int8=engine == "ours_int8").extra_bytes()
        if engine == "ours" and batch == 1 and device == "cpu" and dtype == "float32":
            from utils.decoding import compiling  # as gpt2_generate_main.py --compile on
            reason, seconds = compiling.timed_compile_step(model)
            if reason is None:
                compiling.freeze_garbage_collector()
            print(f"NOTE compiled step: {reason or f'on ({seconds:.1f} s to compile)'}",
                  flush=True)

        def decode(n):
            return generate(model, contexts, length + n, strategy="greedy",
                            end_token=NEVER)
        return decode, prepared
    if engine == "hf":
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
        return decode, 0
    if engine == "texar":
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)

        def decode(n):
            with torch.no_grad():
                # texar returns max_decoding_length + 1 tokens, context included.
                out, _ = model(decoding_strategy="infer_greedy", context=ids,
                               context_sequence_length=lengths,
                               max_decoding_length=length + n - 1, end_token=NEVER)
            return out.sample_id[:, length:].tolist()
        return decode, 0
    raise ValueError(engine)


def worker_main(spec: str) -> None:
    """One engine on one case, timed on request: builds the engine, warms it
    up, prints READY, then answers each `run` line on stdin with one timed
    pass (decode(1) for TTFT, then decode(new_tokens)) and `stop` with its
    peak memory."""
    args = json.loads(spec)
    warnings.simplefilter("ignore")
    device, new_tokens = args["device"], args["new_tokens"]
    decode, prepared = make_decoder(args["engine"], args["batch"], args["length"], device,
                                    args["threads"], args["dtype"], args["ct2_dir"],
                                    args["prompt_ids"])

    def timed(n):
        _sync(device)
        start = time.perf_counter()
        result = decode(n)
        _sync(device)
        return time.perf_counter() - start, result

    # Peak memory counts from before the warm-up, so one-time allocations
    # (allocator growth, library workspaces) are included for every engine.
    base = _reset_peak(device)
    decode(2)  # warm-up: first-call allocations and kernel selection
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            ttft = timed(1)[0]
            seconds, tokens = timed(new_tokens)
            assert all(len(row) == new_tokens for row in tokens), "early stop"
            print("RESULT " + json.dumps({"ttft": ttft, "seconds": seconds,
                                          "first_row": tokens[0]}), flush=True)
        elif line.strip() == "stop":
            print("RESULT " + json.dumps({"peak_bytes": _peak(device) - base,
                                          "prepared_bytes": prepared}), flush=True)
            return


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


class WorkerFailed(Exception):
    pass


class Worker:
    """An engine's worker process (worker_main), driven line by line."""

    def __init__(self, **spec):
        self.engine = spec["engine"]
        self.errors = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, cwd=REPO_ROOT)

    def _read(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):]
            if line.startswith("NOTE "):
                print(f"  {self.engine}: {line[5:].strip()}", flush=True)
        self.proc.wait()
        self.errors.seek(0)
        tail = self.errors.read().strip().splitlines()[-3:]
        raise WorkerFailed(" | ".join(tail) or f"exit {self.proc.returncode}")

    def ready(self) -> None:
        self._read("READY")  # NOTE lines before it are printed by _read

    def ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.errors.close()


# Between two timed runs: long enough for the last engine's idle OpenMP
# threads to stop spinning, so they take no core from the next one.
PAUSE_S = 0.3


def measure_case(engines, batch: int, length: int, new_tokens: int, device: str,
                 threads: int, repeats: int, dtype: str, ct2_dir: str = None) -> list:
    """Time every engine on one case, interleaved: each round runs every
    engine once (in a rotating order), so other load on a shared machine
    falls on all engines alike and the per-round ratios are paired."""
    spec = dict(batch=batch, length=length, new_tokens=new_tokens, device=device,
                threads=threads, dtype=dtype, ct2_dir=ct2_dir,
                prompt_ids=prompts(batch, length).tolist())
    workers, failed = {}, {}
    try:
        for engine in engines:  # built one after another: no timing overlaps a build
            worker = Worker(engine=engine, **spec)
            try:
                worker.ready()
                workers[engine] = worker
            except WorkerFailed as err:
                failed[engine] = str(err)
                worker.close()
        runs = {engine: [] for engine in workers}
        names = list(workers)
        for round_ in range(repeats if names else 0):
            for engine in names[round_ % len(names):] + names[:round_ % len(names)]:
                if engine in failed:
                    continue
                time.sleep(PAUSE_S)
                try:
                    runs[engine].append(workers[engine].ask("run"))
                except WorkerFailed as err:
                    failed[engine] = str(err)
        results = []
        for engine in engines:
            if engine in failed:
                results.append({"engine": engine, "batch": batch, "prompt": length,
                                "error": failed[engine]})
                continue
            memory = workers[engine].ask("stop")
            results.append(_summary(engine, batch, length, new_tokens, runs[engine], memory))
        return results
    finally:
        for worker in workers.values():
            worker.close()


def _summary(engine: str, batch: int, length: int, new_tokens: int, runs: list,
             memory: dict) -> dict:
    ttft = statistics.median(r["ttft"] for r in runs)
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"engine": engine, "batch": batch, "prompt": length, "total": length + new_tokens,
            "ttft": ttft, "seconds": seconds,
            "tok_s": batch * new_tokens / seconds,
            "decode_tok_s": batch * (new_tokens - 1) / max(seconds - ttft, 1e-9),
            "round_tok_s": [batch * new_tokens / r["seconds"] for r in runs],
            "first_row": runs[-1]["first_row"], **memory}


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's tok/s / b's in the same round."""
    pairs = list(zip(a["round_tok_s"], b["round_tok_s"]))
    return statistics.median(x / y for x, y in pairs)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--prompt_lengths", default="8,200,512")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--engines",
                        default="ours,ours_eager,ours_int8,ct2,ct2_int8,hf,texar")
    parser.add_argument("--texar_max_prompt", type=int, default=None,
                        help="run texar's built-in decoding only on prompts up to this length")
    parser.add_argument("--skip_texar_long", action="store_true",
                        help="same as --texar_max_prompt 200")
    parser.add_argument("--texar_max_batch", type=int, default=None,
                        help="run texar's built-in decoding only up to this batch size")
    parser.add_argument("--quick", action="store_true",
                        help="batch 1, prompts 8 and 200, texar on the 8-token prompt only")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds per case: every engine runs once per round, "
                             "interleaved; medians and paired ratios are reported")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="weights and activations of every engine (default float32)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cli", action="store_true",
                        help="also time gpt2_generate_main.py against CTranslate2's "
                             "streaming generator, whole process (CPU, float32)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)

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
          f"greedy, {args.repeats} interleaved rounds")
    results = []
    for batch in batches:
        for length in lengths:
            case_engines = [e for e in engines if not (e == "texar" and (
                (texar_max_prompt is not None and length > texar_max_prompt)
                or (texar_max_batch is not None and batch > texar_max_batch)))]
            for r in measure_case(case_engines, batch, length, args.new_tokens, device,
                                  args.threads, args.repeats, args.dtype, ct2_dir):
                results.append(r)
                if "error" in r:
                    print(f"  {r['engine']} batch {batch} prompt {length}: FAILED {r['error']}")
                else:
                    print(f"  {r['engine']:9s} batch {batch:2d} prompt {length:3d}: "
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
    header = (f"{'batch':>5} {'prompt':>6} {'engine':>11} {'tok/s':>8} {'TTFT ms':>8} "
              f"{'peak MiB':>8} {'%ceil':>6} {'x texar':>8} {'x hf':>6} {'x ct2':>6} "
              f"{'x ct2i8':>7} {'same ids':>8} {'prep MiB':>8}")
    print()
    print(header)
    print("-" * len(header))
    for (batch, prompt), engines in sorted(by_case.items()):
        ceiling = batch * bandwidth / bytes_per_token(batch, prompt, new_tokens, itemsize)
        ref_ids = engines.get("hf", engines.get("texar", engines.get("ct2", {}))).get(
            "first_row")
        for name in ("ours", "ours_eager", "ours_onednn", "ours_int8", "ct2", "ct2_int8",
                     "hf", "texar"):
            r = engines.get(name)
            if r is None:
                continue
            vs = {k: (f"{paired_ratio(r, engines[k]):.2f}" if k in engines else "-")
                  for k in ("texar", "hf", "ct2", "ct2_int8")}
            same = "-" if ref_ids is None else ("yes" if r["first_row"] == ref_ids else "NO")
            if name.endswith("int8") and same == "NO":
                same = "no (8-bit)"  # int8 is not expected to match exactly
            # The ceiling counts float32 weight bytes: not the int8 engines'.
            ceil = ("     -" if name.endswith("int8")
                    else f"{100 * r['decode_tok_s'] / ceiling:5.0f}%")
            print(f"{batch:>5} {prompt:>6} {name:>11} {r['tok_s']:8.1f} "
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
