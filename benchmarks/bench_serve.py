"""gpt2_serve_main.py under concurrent clients, against the same requests sent
one after another and against one gpt2_generate_main.py run per request.

Model: GPT-2 124M with random weights (benchmarks/bench_generate.py's seed),
saved as a checkpoint in a temporary folder; greedy completions of
--tokens new tokens for distinct prompts of 10-20 tokens cut from
data/toy/train.txt. For each number of clients N, in every round (the order
of the two alternating between rounds, so a slower period of a shared machine
hits both alike):
  - idle: PROBES streamed 8-token requests (the probe: the first prompt), one
    after another, to the idle server;
  - concurrent: N streaming requests sent at once; once every one has its first
    token, up to PROBES probes one after another while none of the N has
    finished measure the time to first token under that load;
  - sequential: the same N requests, one after another, to the same server.
Reported: wall time for all N, aggregate tokens/s, time to first token (TTFT)
and per-request latency (p50/p95), the probes' median TTFT under load against
the idle probes' median, whether the concurrent texts equal the sequential
ones, and one CLI run per request (--cli_requests of them timed, process start
and model loading included; the total for N is their mean x N).

    python benchmarks/bench_serve.py --clients 1,4,8,16 --tokens 64
"""
import argparse
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

MODEL_NAME = "bench"
PROBES = 3  # probe requests per measurement (idle, or under each load)
PROBE_TOKENS = 8


def write_checkpoint(directory: str) -> str:
    from benchmarks.bench_generate import build_texar
    from utils.checkpoints.weights import checkpoint_model_fields, save_checkpoint
    model = build_texar("cpu")
    path = os.path.join(directory, "model.ckpt")
    save_checkpoint(path, {"model": model.state_dict(),
                           **checkpoint_model_fields(model.hparams.todict())})
    return path


def make_prompts(count: int):
    """`count` distinct prompts of 10-20 tokens from the toy training text."""
    from utils.processor import get_encoder
    encoder = get_encoder()
    with open(os.path.join(REPO_ROOT, "data", "toy", "train.txt"), encoding="utf-8") as f:
        words = f.read().split()
    prompts = []
    for i in range(count):
        start = (i * 37) % max(1, len(words) - 40)
        text = " ".join(words[start:start + 8 + i % 6])
        ids = encoder.encode(text)[:20]
        prompts.append(encoder.decode(ids))
    return prompts


class ServerProcess:
    def __init__(self, checkpoint: str, max_batch_size: int, extra):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "gpt2_serve_main.py"),
             "--checkpoint", checkpoint, "--model_name", MODEL_NAME, "--port", "0",
             "--max_batch_size", str(max_batch_size), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line!r}")
        self.port = int(match.group(1))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout],
                         daemon=True).start()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def stream_completion(port: int, prompt: str, tokens: int, start_gate=None,
                      first_chunk=None):
    """(text, seconds to the first chunk, seconds in all) of one streamed
    greedy completion; `first_chunk` (a threading.Event) is set when the
    first chunk arrives."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens,
                       "temperature": 0, "stream": True})
    if start_gate is not None:
        start_gate.wait()
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, pieces = None, []
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if first is None:
            first = time.perf_counter() - start
            if first_chunk is not None:
                first_chunk.set()
        pieces.append(chunk["choices"][0]["text"])
    conn.close()
    return "".join(pieces), first, time.perf_counter() - start


def run_sequential(port, prompts, tokens):
    start = time.perf_counter()
    results = [stream_completion(port, p, tokens) for p in prompts]
    return results, time.perf_counter() - start


def run_concurrent(port, prompts, tokens):
    """All requests at once; probes once all have their first token."""
    results = [None] * len(prompts)
    gate = threading.Barrier(len(prompts) + 1)
    started = [threading.Event() for _ in prompts]

    def one(i):
        try:
            results[i] = stream_completion(port, prompts[i], tokens, gate, started[i])
        finally:
            started[i].set()  # an error still lets the probe go
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    gate.wait()
    start = time.perf_counter()
    probes = []
    if len(prompts) > 1:
        for event in started:  # every request is decoding
            event.wait()
        while len(probes) < PROBES and all(r is None for r in results):
            probes.append(stream_completion(port, prompts[0], PROBE_TOKENS)[1])
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start, probes


def idle_probes(port, prompt):
    return [stream_completion(port, prompt, PROBE_TOKENS)[1] for _ in range(PROBES)]


def cli_seconds(checkpoint: str, prompt: str, tokens: int):
    """(seconds, text) of gpt2_generate_main.py for one request."""
    from utils.processor import get_encoder
    length = len(get_encoder().encode(prompt)) + tokens
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "gpt2_generate_main.py"),
         "--checkpoint", checkpoint, "--prompt", prompt, "--decoding_strategy",
         "greedy", "--max_decoding_length", str(length)],
        capture_output=True, text=True, cwd=REPO_ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1:])
    text = re.findall(r"=+ SAMPLE \d+ =+\n(.*?)\n(?==+)", result.stdout, re.S)
    return seconds, text[0] if text else None


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cli_requests", type=int, default=2,
                        help="CLI runs timed per client count (0: skip the CLI)")
    parser.add_argument("--server_args", default="--compile off",
                        help="extra gpt2_serve_main.py flags (quoted)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench_serve_")
    checkpoint = write_checkpoint(workdir)
    prompts = make_prompts(max(clients))
    batch = max(clients) + 1  # room for the probe beside the largest load
    server = ServerProcess(checkpoint, batch, args.server_args.split())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"server flags: --max_batch_size {batch} {args.server_args}")
    rows = []
    try:
        stream_completion(server.port, prompts[0], 4)  # warm-up
        measured = {n: {"seq": [], "con": []} for n in clients}
        idle = []
        for r in range(args.rounds):
            idle += idle_probes(server.port, prompts[0])
            for n in clients:
                order = ("seq", "con") if r % 2 == 0 else ("con", "seq")
                for kind in order:
                    if kind == "seq":
                        results, wall = run_sequential(server.port, prompts[:n], args.tokens)
                        measured[n]["seq"].append((results, wall, None))
                    else:
                        measured[n]["con"].append(
                            run_concurrent(server.port, prompts[:n], args.tokens))
        idle_ttft = statistics.median(idle)
        for n in clients:
            seq = measured[n]["seq"]
            con = measured[n]["con"]
            seq_wall = statistics.median(w for _, w, _ in seq)
            con_wall = statistics.median(w for _, w, _ in con)
            same = all([t for t, _, _ in res] == [t for t, _, _ in seq[0][0]]
                       for res, _, _ in seq + con)
            ttfts = [f for res, _, _ in con for _, f, _ in res]
            latencies = [s for res, _, _ in con for _, _, s in res]
            probes = [p for _, _, ps in con for p in ps]
            row = {"clients": n, "tokens": args.tokens, "sequential_s": seq_wall,
                   "concurrent_s": con_wall, "speedup": seq_wall / con_wall,
                   "tok_s": n * args.tokens / con_wall,
                   "seq_tok_s": n * args.tokens / seq_wall,
                   "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
                   "latency_p50": percentile(latencies, 0.5),
                   "latency_p95": percentile(latencies, 0.95),
                   "probe_ttft": statistics.median(probes) if probes else None,
                   "idle_ttft": idle_ttft, "identical": same}
            if args.cli_requests:
                runs = [cli_seconds(checkpoint, p, args.tokens)
                        for p in prompts[:min(n, args.cli_requests)]]
                row["cli_s"] = statistics.mean(s for s, _ in runs) * n
                row["cli_same"] = all(text == seq[0][0][i][0]
                                      for i, (_, text) in enumerate(runs))
            rows.append(row)
    finally:
        server.stop()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def print_table(rows) -> None:
    print("| clients | tokens each | concurrent s | sequential s | one CLI run each s "
          "| concurrent vs sequential | vs CLI | tok/s concurrent | tok/s sequential "
          "| TTFT p50 / p95 s | latency p50 / p95 s | probe TTFT vs idle | same texts |")
    print("|" + " --- |" * 13)
    for r in rows:
        cli = f"{r['cli_s']:.1f}" if "cli_s" in r else "-"
        vs_cli = f"{r['cli_s'] / r['concurrent_s']:.1f}x" if "cli_s" in r else "-"
        probe = (f"{r['probe_ttft']:.3f} / {r['idle_ttft']:.3f} = "
                 f"{r['probe_ttft'] / r['idle_ttft']:.1f}x" if r["probe_ttft"] else "-")
        same = "yes" if r["identical"] else "NO"
        if "cli_same" in r:
            same += ", CLI " + ("yes" if r["cli_same"] else "NO")
        print(f"| {r['clients']} | {r['tokens']} | {r['concurrent_s']:.2f} | "
              f"{r['sequential_s']:.2f} | {cli} | {r['speedup']:.2f}x | {vs_cli} | "
              f"{r['tok_s']:.1f} | {r['seq_tok_s']:.1f} | {r['ttft_p50']:.3f} / "
              f"{r['ttft_p95']:.3f} | {r['latency_p50']:.2f} / {r['latency_p95']:.2f} | "
              f"{probe} | {same} |")


if __name__ == "__main__":
    main()
