"""Peak memory and seconds per step of training GPT-2 117M to 1558M, per memory option.

Each row trains a randomly initialised GPT-2 of a released size (the real
shapes) for a few optimizer steps on one repeated batch (batch 1 x TOKENS
tokens), in its own subprocess, with the code `gpt2_train_main.py --do_train`
runs: build_model, utils.training.memory_options, utils.training.optimizer, utils.training.lm.lm_nll
under the config's autocast, clip_grad_norm_ 1.0. It reports

  peak   CPU: the subprocess's peak resident memory (ru_maxrss: the model
         build included, which is below the training peak); CUDA: peak
         allocated GPU memory (torch.cuda.max_memory_allocated)
  s/step the mean of the steps after the first (the first warms up)
  loss   first -> last: finite and falling shows the setting really trains
  ratio  peak against the plain fp32 AdamW row of the same size and length
         (when measured in the same run)

Settings (the config_train values):
  adamw            opt AdamW (lr 1e-4), precision fp32: the default config
  adamw+ckpt       ... gradient_checkpointing = True
  adamw+ckpt+bf16  ... precision = "bf16" (autocast; weights stay fp32)
  adafactor+ckpt   opt Adafactor (lr 1e-3), gradient_checkpointing = True
  adafactor+ckpt+frozen   ... trainable = "transformer"
  sgdm+ckpt+frozen opt SGD (lr 1e-3, momentum 0.9), checkpointing, frozen
  lora+ckpt        LoRA adapters (rank 8, alpha 16, attention and mlp) on the
                   frozen fp32 base, AdamW on the adapters, checkpointing

Rows run one at a time. Before each, the memory the row needs is estimated
(weights, gradients, optimizer state, activations); a row needing more than
--max_gb, or more than the machine has free at that moment, is not run and
the table says why and how much it would need.

    python benchmarks/bench_memory.py                      # every size, 1024 tokens
    python benchmarks/bench_memory.py --sizes 117M 345M --tokens 128 1024
    python benchmarks/bench_memory.py --sizes 1558M --settings adafactor+ckpt+frozen
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

GiB = 1024 ** 3
SIZES = {"117M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
         "345M": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
         "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
         "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48)}
# name: (optimizer, its kwargs, gradient_checkpointing, trainable, precision)
SETTINGS = {
    "adamw": ("AdamW", {"lr": 1e-4, "weight_decay": 0.01}, False, "all", "fp32"),
    "adamw+ckpt": ("AdamW", {"lr": 1e-4, "weight_decay": 0.01}, True, "all", "fp32"),
    "adamw+ckpt+bf16": ("AdamW", {"lr": 1e-4, "weight_decay": 0.01}, True, "all", "bf16"),
    "adafactor+ckpt": ("Adafactor", {"lr": 1e-3}, True, "all", "fp32"),
    "adafactor+ckpt+frozen": ("Adafactor", {"lr": 1e-3}, True, "transformer", "fp32"),
    "sgdm+ckpt+frozen": ("SGD", {"lr": 1e-3, "momentum": 0.9}, True, "transformer", "fp32"),
    # trainable "lora": the base frozen, adapters of LORA (the README's example)
    "lora+ckpt": ("AdamW", {"lr": 1e-4, "weight_decay": 0.01}, True, "lora", "fp32"),
}
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["attention", "mlp"]}
BASELINE = "adamw"


# ---------------------------------------------------------------------------
# Estimate (to decide whether a row can run here)

def estimate_bytes(sizes, tokens: int, setting: str) -> float:
    """Rough fp32 peak of a training step: weights, gradients, optimizer
    state, activations kept for backward, logits. Meant to be on the high side."""
    from utils.model import parameter_count
    optimizer, _, checkpointing, trainable, _ = SETTINGS[setting]
    v, e, h, layers = (sizes[k] for k in ("n_vocab", "n_embd", "n_head", "n_layer"))
    params = parameter_count(sizes)
    trained = params - (v * e + sizes["n_ctx"] * e if trainable == "transformer" else 0)
    if trainable == "lora":  # rank x (in + out) per adapted layer: q, k, v, o, fc1, fc2
        trained = layers * LORA["rank"] * (4 * 2 * e + 2 * 5 * e)
    state_per_weight = {"AdamW": 2, "SGD": 1, "Adafactor": 0.05}[optimizer]
    # Per layer, fp32: ~34 n_embd-wide and ~5 per-head T x T tensors (Korthikanti
    # et al.'s count, doubled for 4-byte floats).
    per_layer = 4 * tokens * (34 * e + 5 * h * tokens)
    activations = per_layer * (1 if checkpointing else layers) + layers * 4 * tokens * e
    logits = 4 * 4 * tokens * v  # logits, log-softmax, their gradients
    overhead = 0.6 * GiB  # Python, torch and texar themselves, measured at 117M
    return (4 * params + 4 * trained * (1 + state_per_weight) + activations + logits
            + overhead)


def free_bytes(device: str) -> float:
    import torch
    from utils.memory import available_bytes
    free = available_bytes(torch.device(device))
    return float("inf") if free is None else free


# ---------------------------------------------------------------------------
# One row, in a subprocess

def run_row(size: str, tokens: int, setting: str, steps: int, device_name: str) -> dict:
    """Train `steps` steps and measure; runs inside the row's own process."""
    import torch
    from utils.device import resolve_device
    from utils.training.lm import autocast, lm_nll
    from utils.training.memory_options import apply_memory_options, trainable_parameter_count
    from utils.lora import add_adapters, lora_settings
    from utils.heap import map_large_blocks_separately
    from utils.model import build_model, gpt2_hparams
    from utils.training.optimizer import build_optimizer

    device = resolve_device(device_name)
    optimizer_type, kwargs, checkpointing, trainable, precision = SETTINGS[setting]
    if checkpointing or trainable != "all":  # a memory option: as gpt2_train_main.py does
        map_large_blocks_separately()
    torch.manual_seed(0)
    model = build_model(gpt2_hparams(**SIZES[size])).to(device)
    model.train()
    if trainable == "lora":
        add_adapters(model, lora_settings(LORA, "bench_memory's LORA"))
    apply_memory_options(model, checkpointing, "all" if trainable == "lora" else trainable)
    opt = {"optimizer": {"type": optimizer_type, "kwargs": kwargs},
           "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 1.0}}}
    optimizer, clip, _ = build_optimizer(model, opt, precision, device)
    ids = torch.randint(0, SIZES[size]["n_vocab"], (1, tokens + 1), device=device)
    lengths = torch.tensor([tokens + 1], device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        with autocast(precision, device):
            nll, count = lm_nll(model, ids, lengths)
        loss = nll / count
        loss.backward()
        clip(parameters=model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        print(f"  {size} {tokens} {setting}: step {step + 1}/{steps} loss "
              f"{losses[-1]:.4f} in {times[-1]:.1f} s", file=sys.stderr, flush=True)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = times[1:] or times
    return {"size": size, "tokens": tokens, "setting": setting, "device": str(device),
            "peak_bytes": peak, "s_per_step": sum(timed) / len(timed), "losses": losses,
            "trained_parameters": trainable_parameter_count(model)}


def measure(size, tokens, setting, steps, device, timeout_s) -> dict:
    """run_row in a fresh subprocess (a clean peak), or why it did not finish."""
    cmd = [sys.executable, os.path.abspath(__file__), "--row", size, str(tokens),
           setting, "--steps", str(steps), "--device", device]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=timeout_s,
                              text=True, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout_s} s"}
    if proc.returncode != 0:
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"skipped": why}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# The table

def describe(row: dict, baseline: dict) -> str:
    key = f"{row['size']:>6} {row['tokens']:>5} {row['setting']:<22}"
    if "skipped" in row:
        return f"{key} {'-':>9} {'-':>8} {'-':>17} {'-':>6}  {row['skipped']}"
    first, last = row["losses"][0], row["losses"][-1]
    ratio = (f"{row['peak_bytes'] / baseline['peak_bytes']:.2f}x"
             if baseline and "peak_bytes" in baseline else "-")
    trend = "falling" if last < first else "NOT falling"
    return (f"{key} {row['peak_bytes'] / GiB:>7.2f} G {row['s_per_step']:>8.1f} "
            f"{first:>7.3f}->{last:<8.3f} {ratio:>6}  {trend}; estimate "
            f"{row['estimate'] / GiB:.1f} G")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=3,
                        help="Optimizer steps per row (at least 2; default 3).")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps.")
    parser.add_argument("--max_gb", type=float, default=20.0,
                        help="Skip rows estimated above this many GiB (default 20).")
    parser.add_argument("--timeout", type=int, default=1800,
                        help="Seconds one row may take (default 1800).")
    parser.add_argument("--row", nargs=3, metavar=("SIZE", "TOKENS", "SETTING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (a falling loss needs two)")
    if args.row:
        size, tokens, setting = args.row
        print(json.dumps(run_row(size, int(tokens), setting, args.steps, args.device)))
        return 0

    rows = []
    print(f"{'model':>6} {'tok':>5} {'setting':<22} {'peak':>9} {'s/step':>8} "
          f"{'loss first->last':>17} {'ratio':>6}  note", flush=True)
    for size in args.sizes:
        for tokens in args.tokens:
            baseline = None
            for setting in args.settings:
                need = estimate_bytes(SIZES[size], tokens, setting)
                free = free_bytes(args.device)
                if need > args.max_gb * GiB:
                    row = {"skipped": f"estimated {need / GiB:.1f} G > --max_gb "
                                      f"{args.max_gb:g}"}
                elif need > free:
                    row = {"skipped": f"estimated {need / GiB:.1f} G but only "
                                      f"{free / GiB:.1f} G free now: rerun later"}
                else:
                    row = measure(size, tokens, setting, args.steps, args.device,
                                  args.timeout)
                row.update(size=size, tokens=tokens, setting=setting, estimate=need)
                if setting == BASELINE:
                    baseline = row
                rows.append(row)
                print(describe(row, baseline), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
