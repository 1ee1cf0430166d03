"""The CLI path of benchmarks/bench_generate.py --cli: what a user runs.

`gpt2_generate_main.py --is_interactive --decoding_strategy greedy` on the
benchmark's random weights (a Hugging Face directory, as --pretrain_model_dir
takes), one prompt line on stdin, the continuation streamed by its printer;
against CTranslate2 float32 doing the same (benchmarks/ct2_engine.py
--stream). Each is timed as a whole process for 1 and for N+1 new tokens:
N / (difference) is the decoding rate through the CLI, start-up, loading and
the prompt pass cancelling out; the 1-token time is the CLI's time to first
token, start-up included (for ours, with --compile auto an interactive session
compiles its decoding step at start-up, from inductor's cache after the first
run: utils/compiled_step.py).
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
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=text + "\n", capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=1200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1:])
    return seconds, proc.stdout


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
    print(f"\nCLI path (whole process, interactive, streaming; float32, greedy): "
          f"{new_tokens} tokens as the difference of {new_tokens + 1} and 1 new token; "
          f"{repeats} interleaved rounds")
    rows = []
    for length in lengths:
        text, n_prompt = prompt_text(length)
        texts, runs = {}, {"ours": [], "ct2": []}
        for round_ in range(repeats):
            for engine in (("ours", "ct2") if round_ % 2 == 0 else ("ct2", "ours")):
                short = _commands(hf_dir, ct2_dir, n_prompt + 1)[engine]
                long = _commands(hf_dir, ct2_dir, n_prompt + new_tokens + 1)[engine]
                one = _run(short, text)[0]
                full, out = _run(long, text)
                texts[engine] = _continuation(out)
                runs[engine].append((one, full, new_tokens / max(full - one, 1e-9)))
        same = texts["ours"] == texts["ct2"]
        for engine in ("ours", "ct2"):
            ratio = statistics.median(a[2] / b[2] for a, b in zip(runs[engine], runs["ct2"]))
            r = {"engine": engine, "prompt": n_prompt,
                 "first_s": statistics.median(one for one, _, _ in runs[engine]),
                 "full_s": statistics.median(full for _, full, _ in runs[engine]),
                 "tok_s": statistics.median(rate for _, _, rate in runs[engine]),
                 "round_tok_s": [rate for _, _, rate in runs[engine]],
                 "x_ct2": ratio, "same_text": same}
            print(f"  prompt {n_prompt:3d} {engine:5s}: {r['tok_s']:6.1f} tok/s through "
                  f"the CLI, 1-token process {r['first_s']:5.2f} s, x ct2 {ratio:.2f}, "
                  f"same text {'yes' if same else 'NO'}", flush=True)
            rows.append(r)
    return rows
