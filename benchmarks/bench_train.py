"""Benchmark a training step: this project's trainer against Hugging Face GPT-2.

Both engines train the same GPT-2 117M weights (configs.config_model_117M,
random, no dropout) on the same batches with the same optimizer: torch AdamW,
lr 1e-4, weight decay 0.01 on matrices only, gradient clipping at 1.0, and
the same AdamW implementation (our trainer's default: fused where torch has
it; --hf_optimizer default gives HF torch's own default instead).

  ours  utils.training.trainer.Trainer._train_step: texar's GPT2Decoder, exactly the
        code `gpt2_train_main.py --do_train` runs (attention = "fused")
  texar the same with attention = "texar": texar's original attention
        (not run by default: --engines ours,texar,hf)
  hf    transformers' GPT2LMHeadModel(input_ids, attention_mask, labels).loss
        .backward(), clip_grad_norm_, step, zero_grad (skipped when
        transformers is not installed; it is not a dependency)

Scenarios:
  full   batch 4 x 128 tokens, no padding: the headline number
  long   batch 1 x 1024 tokens (packed text at GPT-2's full context)
  mid    batch 4 x 512 tokens
  short  batches of 4 lines of data/toy/train.txt (about 13 tokens each);
         HF gets them padded to 128 as the original example's fixed-length
         records were (padding="max_length"), ours pads to the batch's
         longest line

tokens/s counts real (non-padding) tokens. Rounds are interleaved (one step
of each engine per round) and the median step time is reported, so load from
other processes hits both alike; "vs hf" is the median over rounds of the
per-round ratio. Still, on a shared machine re-run for absolute numbers.

Peak memory: before each step the process's free heap goes back to the
system (malloc_trim) and its peak resident size is reset (/proc/self/clear_refs);
the step's peak minus the resident size at its start is what the step adds
(activations, gradients, temporaries): "step MB". "peak MB" adds the bytes
the engine holds between steps (weights and optimizer state, counted from its
tensors). On CUDA both come from torch.cuda's peak-allocated counter. Linux
only on CPU (elsewhere: "-").

Roofline: the model FLOPs of a step (6 per matrix weight per token, the output
layer included, plus 6 * layers * T * n_embd per token for causal attention)
per second, as a share of the best float32 matrix product rate measured on
the same threads in the same round (a [B*T, 768] x [768, 3072] product, like
the feed-forward's); the median over rounds. bf16 runs measure it in bf16. The first losses of the two engines are printed: equal
losses show the same computation is being timed.

    python benchmarks/bench_train.py                 # both scenarios, 5 rounds
    python benchmarks/bench_train.py --threads 1     # steadier on a shared CPU
    python benchmarks/bench_train.py --precision bf16 --scenarios full
    python benchmarks/bench_train.py --scenarios full,long,mid --engines ours,texar,hf
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

BATCH, LENGTH, SEED = 4, 128, 1234
# scenario -> (batch, tokens per row) of the full-row scenarios
SHAPES = {"full": (4, 128), "long": (1, 1024), "mid": (4, 512)}
LABELS = {"full": "full (4 x 128)", "long": "long (1 x 1024)", "mid": "mid (4 x 512)",
          "short": "short (4 toy lines)"}
OPT_KWARGS = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="Timed steps per engine.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    p.add_argument("--threads", type=int, default=None, help="torch threads.")
    p.add_argument("--scenarios", default="full,short",
                   help="Comma-separated: full, long, mid, short.")
    p.add_argument("--engines", default="ours,hf", help="Comma-separated: ours, texar, hf.")
    p.add_argument("--compile", action="store_true",
                   help="Ours with compile = True (torch.compile; slow to start).")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="Autocast for both engines (weights stay fp32).")
    p.add_argument("--hf_optimizer", default="same", choices=("same", "default"),
                   help="HF's AdamW: our implementation (same) or torch's default.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present).")
    p.add_argument("--json", default=None, help="Also write the rows here.")
    return p.parse_args()


def shape_of(scenario):
    """(batch, tokens per row) of a scenario ("short": 4 toy lines, 128 at most)."""
    return SHAPES.get(scenario, (BATCH, LENGTH))


def build_ours(args, device, data_dir, out_dir, scenario, attention):
    import torch
    from utils.training import distributed as dist_utils
    from utils.data.records import PreparedSplit
    from utils.model import build_model, load_model_hparams
    from utils.training.config import TrainConfig
    from utils.training.trainer import Trainer

    batch, length = shape_of(scenario)
    torch.manual_seed(SEED)
    hparams = load_model_hparams("configs.config_model_117M")
    model = build_model(hparams).to(device)
    cfg = TrainConfig(
        data_dir=data_dir, max_seq_length=length, train_batch_size=batch,
        eval_batch_size=batch, test_batch_size=batch, max_train_epoch=1,
        display_steps=-1, eval_steps=-1, checkpoint_steps=-1,
        opt={"optimizer": {"type": "AdamW", "kwargs": dict(OPT_KWARGS)},
             "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 1.0}}},
        precision=args.precision, name="benchmark", attention=attention,
        compile=args.compile and attention == "fused")
    ctx = dist_utils.init_distributed(False)
    ctx.device = device
    split = PreparedSplit(os.path.join(data_dir, "train.npy"))
    return Trainer(model, hparams, cfg, ctx, split, None, out_dir, progress=False)


def build_hf(ours_model, ours_optimizer, args, device):
    import torch
    from bench_generate import hf_from_texar
    hf = hf_from_texar(ours_model).to(device).train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    kwargs = dict(OPT_KWARGS)
    if args.hf_optimizer == "same":
        for key in ("fused", "foreach"):
            kwargs[key] = ours_optimizer.defaults.get(key)
    optimizer = torch.optim.AdamW([{"params": decay},
                                   {"params": no_decay, "weight_decay": 0.0}], **kwargs)
    return hf, optimizer


def hf_step(hf, optimizer, ids, lengths, args, device):
    """One HF training step on ids padded to the scenario's length; returns the loss."""
    import torch
    positions = torch.arange(ids.size(1), device=device)
    mask = positions[None, :] < lengths[:, None]
    labels = ids.masked_fill(~mask, -100)
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16"
                          else torch.float16)
           if args.precision != "fp32" else _null())
    with ctx:
        loss = hf(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _null():
    import contextlib
    return contextlib.nullcontext()


def make_data(scenario, data_dir):
    """Write train.npy for the scenario; returns the list of index batches."""
    import numpy as np
    from utils.data.records import record_dtype
    from utils.data.prepare import prepare_split
    from utils.processor import EOS_ID
    batch, length = shape_of(scenario)
    if scenario in SHAPES:
        gen = np.random.default_rng(SEED)
        rec = np.zeros(batch * 8, dtype=record_dtype(length, 50257))
        rec["length"] = length
        rec["text_ids"] = gen.integers(0, EOS_ID, size=(len(rec), length))
        np.save(os.path.join(data_dir, "train.npy"), rec, allow_pickle=False)
    else:
        prepare_split(os.path.join(REPO_ROOT, "data", "toy", "train.txt"),
                      os.path.join(data_dir, "train.npy"), max_seq_length=length,
                      vocab_dir=None, num_workers=1, progress=False)
    from utils.data.records import PreparedSplit
    n = len(PreparedSplit(os.path.join(data_dir, "train.npy")))
    order = np.random.default_rng(SEED).permutation(n)
    return [order[i:i + batch].tolist() for i in range(0, n - batch + 1, batch)]


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------ memory

class StepMemory:
    """Bytes a step adds above what the process held when it started (see the
    module docstring); None where it cannot be measured."""

    def __init__(self, device):
        import ctypes
        self.device = device
        self.libc = None
        if device.type == "cpu" and os.path.exists("/proc/self/clear_refs"):
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.libc = None

    @staticmethod
    def _status_kb(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.libc is not None:
            self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = self._status_kb("VmRSS")

    def added(self):
        import torch
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.libc is None:
            return None
        return self._status_kb("VmHWM") - self.base


def held_bytes(model, optimizer):
    """Bytes of the weights and optimizer state held between steps (each tensor once)."""
    import torch
    seen, total = set(), 0
    tensors = list(model.parameters())
    for state in optimizer.state.values():
        tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------ roofline

def step_flops(model_sizes, tokens, length):
    """Model FLOPs of one training step over `tokens` tokens in rows of `length`:
    6 per matrix weight per token (Q/K/V/O, feed-forward, the output layer) and
    6 * layers * length * n_embd per token for causal attention (forward: about
    length/2 keys, 2 products, 2 FLOPs each; backward twice that)."""
    e, layers, v = model_sizes["n_embd"], model_sizes["n_layer"], model_sizes["n_vocab"]
    matrix_weights = layers * 12 * e * e + v * e
    return tokens * (6 * matrix_weights + 6 * layers * length * e)


def matmul_peak(device, precision, rows, tries=3):
    """Best FLOP/s of a [rows, 768] x [768, 3072] product (the feed-forward's
    shape) over a few tries: the roofline the steps of the same round are
    measured against (measured every round: other processes' load moves it)."""
    import torch
    dtype = torch.bfloat16 if precision == "bf16" else (
        torch.float16 if precision == "fp16" else torch.float32)
    a = torch.randn(rows, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    best = 0.0
    for _ in range(tries):
        sync(device)
        start = time.perf_counter()
        for _ in range(2):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * 2 * rows * 768 * 3072 / (time.perf_counter() - start))
    return best


# ------------------------------------------------------------------ the run

def run_scenario(scenario, args, device, engine_names):
    import torch
    from utils.processor import EOS_ID
    from utils.training.trainer import LossWindow
    batch, length = shape_of(scenario)
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as out:
        batches = make_data(scenario, data_dir)
        engines, held = {}, {}
        for name in engine_names:
            if name in ("ours", "texar"):
                trainer = build_ours(args, device, data_dir, out,
                                     scenario, "fused" if name == "ours" else "texar")
                engines[name] = trainer
        first_trainer = next(iter(engines.values()))
        if "hf" in engine_names:
            engines["hf"] = build_hf(first_trainer.plain_model, first_trainer.optimizer,
                                     args, device)
        engines = {name: engines[name] for name in engine_names}
        split = first_trainer.train_split
        sizes = first_trainer.model_fields["model_sizes"]
        times = {name: [] for name in engines}
        added = {name: [] for name in engines}
        tokens = {name: 0 for name in engines}
        first_loss = {}
        window = LossWindow(device)
        memory = StepMemory(device)
        needed = args.warmup + args.rounds
        peaks = []
        for step in range(needed):
            indices = batches[step % len(batches)]
            if step >= args.warmup:
                peaks.append(matmul_peak(device, args.precision, batch * length))
            for name, engine in engines.items():
                sync(device)
                memory.start()
                start = time.perf_counter()
                if name != "hf":
                    window.reset()
                    engine._train_step([indices], window)
                    loss = float(window.nll) / window.tokens
                else:
                    ids, lengths = split.batch(indices, EOS_ID)
                    padded = torch.full((len(indices), length), EOS_ID, dtype=torch.long)
                    padded[:, :ids.size(1)] = ids
                    loss = hf_step(*engine, padded.to(device), lengths.to(device),
                                   args, device)
                sync(device)
                elapsed = time.perf_counter() - start
                first_loss.setdefault(name, loss)
                if step >= args.warmup:
                    times[name].append(elapsed)
                    added[name].append(memory.added())
                    tokens[name] += int(split.lengths[indices].sum())
        for name, engine in engines.items():
            model, optimizer = ((engine.plain_model, engine.optimizer) if name != "hf"
                                else engine)
            held[name] = held_bytes(model, optimizer)
        rows = []
        for name in engines:
            median = statistics.median(times[name])
            per_step = tokens[name] / len(times[name])
            step_added = (None if None in added[name] else max(added[name]))
            # Same tokens each round: HF's step time over this engine's is the
            # tokens/s ratio of that round.
            ratios = ([hf_s / own_s for hf_s, own_s in zip(times["hf"], times[name])]
                      if "hf" in engines else None)
            flops = step_flops(sizes, batch * length, length) if scenario in SHAPES else None
            roofline = (statistics.median(flops / t / p for t, p in zip(times[name], peaks))
                        if flops else None)
            rows.append({
                "scenario": scenario, "engine": name, "step_s": median,
                "tok_s": per_step / median,
                "vs_hf": statistics.median(ratios) if ratios else None,
                "step_bytes": step_added,
                "peak_bytes": None if step_added is None else held[name] + step_added,
                "roofline": roofline, "matmul_flops": statistics.median(peaks),
                "first_loss": first_loss[name],
                "times": times[name], "precision": args.precision, "device": str(device)})
        return rows


def _mb(value):
    return f"{value / 2 ** 20:,.0f}" if value is not None else "-"


def main():
    args = parse_args()
    warnings.simplefilter("ignore")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    engine_names = args.engines.split(",")
    if not {"ours", "texar"} & set(engine_names):
        sys.exit("error: --engines needs ours or texar (HF's weights are copied from ours)")
    try:
        import transformers
        hf_version = transformers.__version__
        transformers.logging.set_verbosity_error()
    except ImportError:
        hf_version = "not installed"
        engine_names = [name for name in engine_names if name != "hf"]
    print(f"GPT-2 117M training step on {device} ({torch.get_num_threads()} threads), "
          f"{args.precision}, AdamW lr 1e-4 wd 0.01, clip 1.0; torch {torch.__version__}, "
          f"transformers {hf_version}; HF optimizer: "
          f"{args.hf_optimizer}; median of {args.rounds} interleaved steps"
          f"{'; ours compiled' if args.compile else ''}")
    print(f"{'scenario':<20} {'engine':<6} {'step s':>7} {'tokens/s':>9} {'vs hf':>6} "
          f"{'step MB':>8} {'peak MB':>8} {'vs hf':>6} {'roofline':>8}   first loss   "
          f"step times (s)")
    results = []
    for scenario in args.scenarios.split(","):
        rows = run_scenario(scenario, args, device, engine_names)
        hf = next((r for r in rows if r["engine"] == "hf"), None)
        for r in rows:
            speed = f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-"
            mem = (f"{r['peak_bytes'] / hf['peak_bytes']:.2f}x"
                   if hf and r["peak_bytes"] and hf["peak_bytes"] else "-")
            roof = f"{100 * r['roofline']:.0f}%" if r["roofline"] else "-"
            print(f"{LABELS[scenario]:<20} {r['engine']:<6} {r['step_s']:>7.2f} "
                  f"{r['tok_s']:>9,.0f} {speed:>6} {_mb(r['step_bytes']):>8} "
                  f"{_mb(r['peak_bytes']):>8} {mem:>6} {roof:>8}   {r['first_loss']:.5f}"
                  f"      {' '.join(f'{t:.2f}' for t in r['times'])}")
            results.append(r)
        if rows[0]["matmul_flops"]:
            batch, length = shape_of(scenario)
            print(f"{'':<20} roofline: {rows[0]['matmul_flops'] / 1e9:,.1f} GFLOP/s, the "
                  f"median over rounds of the best [{batch * length}, 768] x [768, 3072] "
                  f"product (roofline column: median over rounds of the step's share)")
        sys.stdout.flush()
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
