"""The CLI path of benchmarks/bench_generate.py --cli: what a user runs.

`gpt2_generate_main.py --is_interactive --decoding_strategy greedy` on the
benchmark's random weights (a Hugging Face directory, as --pretrain_model_dir
takes), one prompt line on stdin, the continuation streamed by its printer;
against CTranslate2 float32 doing the same (benchmarks/ct2_engine.py
--stream).

Decoding rate through the CLI: the parent reads the process's output as it
arrives and notes when the continuation's first and last characters come;
(N - 1) / (time between them) for N new tokens. That is the streamed rate a
user sees, printer included, and start-up (which differs by seconds between
runs, and for ours includes compiling the decoding step: --compile auto
compiles interactive sessions) does not enter it. Start-up is reported on its
own: the whole process for 1 new token.
"""
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT2_STREAM = os.path.join(REPO_ROOT, "benchmarks", "ct2_engine.py")


def prompt_text(tokens: int):
    """(one line of data/toy text about `tokens` GPT-2 tokens long, its length
    in tokens as the CLI will encode it)."""
    sys.path.insert(0, REPO_ROOT)
    from utils.processor import get_encoder
    encoder = get_encoder()
    with open(os.path.join(REPO_ROOT, "data", "toy", "train.txt"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    line = encoder.decode(encoder.encode(text)[:tokens]).strip()
    return line, len(encoder.encode(line))


def _run(cmd, text: str):
    """(seconds for the whole process, its stdout, [(arrival time, bytes)])."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO_ROOT)
    proc.stdin.write((text + "\n").encode("utf-8"))
    proc.stdin.close()
    chunks = []
    while True:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        chunks.append((time.perf_counter(), data))
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.wait(timeout=1200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(err.strip().splitlines()[-1:])
    return seconds, b"".join(d for _, d in chunks).decode("utf-8"), chunks


def _streamed_span(chunks) -> float:
    """Seconds between the arrival of the continuation's first and last
    characters: the text after the prompt marker, banner lines aside, up to
    the next prompt."""
    marker = "Model input >>> "
    out = b"".join(d for _, d in chunks).decode("utf-8")
    start = out.index(marker) + len(marker)
    end = out.find(marker, start)
    end = len(out) if end < 0 else end
    first = last = None
    offset = start
    for line in out[start:end].split("\n"):
        if not line.startswith("="):  # our SAMPLE banners
            for i, char in enumerate(line):
                if not char.isspace():
                    first = offset + i if first is None else first
                    last = offset + i
        offset += len(line) + 1
    first_byte = len(out[:first].encode("utf-8"))
    last_byte = len(out[:last + 1].encode("utf-8"))
    arrived, t_first, t_last = 0, None, None
    for t, data in chunks:
        arrived += len(data)
        if t_first is None and arrived > first_byte:
            t_first = t
        if t_last is None and arrived >= last_byte:
            t_last = t
    return t_last - t_first


def _commands(hf_dir: str, ct2_dir: str, max_length: int):
    return {"ours": [sys.executable, "gpt2_generate_main.py", "--is_interactive",
                     "--decoding_strategy", "greedy", "--pretrain_model_dir", hf_dir,
                     "--max_decoding_length", str(max_length)],
            "ct2": [sys.executable, CT2_STREAM, "--stream", ct2_dir, str(max_length)]}


def _continuation(stdout: str) -> str:
    """The streamed text after the prompt marker (banners and blank lines aside)."""
    part = stdout.split("Model input >>> ")[1]  # before the next prompt
    return " ".join(line for line in part.splitlines()
                    if line.strip() and not line.startswith("=")).strip()


def time_cli_paths(hf_dir: str, ct2_dir: str, lengths, new_tokens: int, repeats: int):
    """Print and return one row per (prompt length, engine). The two CLIs
    are timed interleaved, round by round, and "x ct2" is the median of the
    per-round ratios, so other load on the machine falls on both alike."""
    print(f"\nCLI path (interactive, streaming; float32, greedy): decoding rate "
          f"from the streamed output of {new_tokens} new tokens, and the whole process "
          f"for 1 new token; {repeats} interleaved rounds")
    rows = []
    for length in lengths:
        text, n_prompt = prompt_text(length)
        texts, runs = {}, {"ours": [], "ct2": []}
        for round_ in range(repeats):
            for engine in (("ours", "ct2") if round_ % 2 == 0 else ("ct2", "ours")):
                one = _run(_commands(hf_dir, ct2_dir, n_prompt + 1)[engine], text)[0]
                long = _commands(hf_dir, ct2_dir, n_prompt + new_tokens)[engine]
                _, out, chunks = _run(long, text)
                texts[engine] = _continuation(out)
                span = _streamed_span(chunks)
                runs[engine].append((one, (new_tokens - 1) / max(span, 1e-9)))
        same = texts["ours"] == texts["ct2"]
        for engine in ("ours", "ct2"):
            ratio = statistics.median(a[1] / b[1] for a, b in zip(runs[engine], runs["ct2"]))
            r = {"engine": engine, "prompt": n_prompt,
                 "first_s": statistics.median(one for one, _ in runs[engine]),
                 "tok_s": statistics.median(rate for _, rate in runs[engine]),
                 "round_tok_s": [rate for _, rate in runs[engine]],
                 "x_ct2": ratio, "same_text": same}
            print(f"  prompt {n_prompt:3d} {engine:5s}: {r['tok_s']:6.1f} tok/s streamed "
                  f"through the CLI, 1-token process {r['first_s']:5.2f} s, x ct2 "
                  f"{ratio:.2f}, same text {'yes' if same else 'NO'}", flush=True)
            rows.append(r)
    return rows
