"""Benchmark a training step: this project's trainer against Hugging Face GPT-2.

Both engines train the same GPT-2 117M weights (configs.config_model_117M,
random, no dropout) on the same batches with the same optimizer: torch AdamW,
lr 1e-4, weight decay 0.01 on matrices only, gradient clipping at 1.0, and
the same AdamW implementation (our trainer's default: fused where torch has
it; --hf_optimizer default gives HF torch's own default instead).

  ours  utils.training.trainer.Trainer._train_step: texar's GPT2Decoder, exactly the
        code `gpt2_train_main.py --do_train` runs
  hf    transformers' GPT2LMHeadModel(input_ids, attention_mask, labels).loss
        .backward(), clip_grad_norm_, step, zero_grad (skipped when
        transformers is not installed; it is not a dependency)

Scenarios:
  full   batch 4 x 128 tokens, no padding: the headline number
  short  batches of 4 lines of data/toy/train.txt (about 13 tokens each);
         HF gets them padded to 128 as the original example's fixed-length
         records were (padding="max_length"), ours pads to the batch's
         longest line

tokens/s counts real (non-padding) tokens. Rounds are interleaved (one step
of each engine per round) and the median step time is reported, so load from
other processes hits both alike; still, on a shared machine re-run for
absolute numbers. The first losses of the two engines are printed: equal
losses show the same computation is being timed.

    python benchmarks/bench_train.py                 # both scenarios, 5 rounds
    python benchmarks/bench_train.py --threads 1     # steadier on a shared CPU
    python benchmarks/bench_train.py --precision bf16 --scenarios full
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
OPT_KWARGS = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="Timed steps per engine.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    p.add_argument("--threads", type=int, default=None, help="torch threads.")
    p.add_argument("--scenarios", default="full,short")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="Autocast for both engines (weights stay fp32).")
    p.add_argument("--hf_optimizer", default="same", choices=("same", "default"),
                   help="HF's AdamW: our implementation (same) or torch's default.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present).")
    p.add_argument("--json", default=None, help="Also write the rows here.")
    return p.parse_args()


def build_ours(args, device, data_dir, out_dir):
    import torch
    from utils.training import distributed as dist_utils
    from utils.data.records import PreparedSplit
    from utils.model import build_model, load_model_hparams
    from utils.training.config import TrainConfig
    from utils.training.trainer import Trainer

    torch.manual_seed(SEED)
    hparams = load_model_hparams("configs.config_model_117M")
    model = build_model(hparams).to(device)
    cfg = TrainConfig(
        data_dir=data_dir, max_seq_length=LENGTH, train_batch_size=BATCH,
        eval_batch_size=BATCH, test_batch_size=BATCH, max_train_epoch=1,
        display_steps=-1, eval_steps=-1, checkpoint_steps=-1,
        opt={"optimizer": {"type": "AdamW", "kwargs": dict(OPT_KWARGS)},
             "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 1.0}}},
        precision=args.precision, name="benchmark")
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
    """One HF training step on ids padded to LENGTH; returns the loss."""
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
    if scenario == "full":
        gen = np.random.default_rng(SEED)
        rec = np.zeros(BATCH * 8, dtype=record_dtype(LENGTH, 50257))
        rec["length"] = LENGTH
        rec["text_ids"] = gen.integers(0, EOS_ID, size=(len(rec), LENGTH))
        np.save(os.path.join(data_dir, "train.npy"), rec, allow_pickle=False)
    else:
        prepare_split(os.path.join(REPO_ROOT, "data", "toy", "train.txt"),
                      os.path.join(data_dir, "train.npy"), max_seq_length=LENGTH,
                      vocab_dir=None, num_workers=1, progress=False)
    from utils.data.records import PreparedSplit
    n = len(PreparedSplit(os.path.join(data_dir, "train.npy")))
    order = np.random.default_rng(SEED).permutation(n)
    return [order[i:i + BATCH].tolist() for i in range(0, n - BATCH + 1, BATCH)]


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_scenario(scenario, args, device, have_hf):
    import torch
    from utils.processor import EOS_ID
    from utils.training.trainer import _Window
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as out:
        batches = make_data(scenario, data_dir)
        trainer = build_ours(args, device, data_dir, out)
        engines = {"ours": None}
        if have_hf:
            engines["hf"] = build_hf(trainer.plain_model, trainer.optimizer, args, device)
        split = trainer.train_split
        times = {name: [] for name in engines}
        tokens = {name: 0 for name in engines}
        first_loss = {}
        window = _Window(device)
        needed = args.warmup + args.rounds
        for step in range(needed):
            indices = batches[step % len(batches)]
            for name, engine in engines.items():
                sync(device)
                start = time.perf_counter()
                if name == "ours":
                    window.reset()
                    trainer._train_step([indices], window)
                    loss = float(window.nll) / window.tokens
                else:
                    ids, lengths = split.batch(indices, EOS_ID)
                    padded = torch.full((len(indices), LENGTH), EOS_ID, dtype=torch.long)
                    padded[:, :ids.size(1)] = ids
                    loss = hf_step(*engine, padded.to(device), lengths.to(device),
                                   args, device)
                sync(device)
                elapsed = time.perf_counter() - start
                first_loss.setdefault(name, loss)
                if step >= args.warmup:
                    times[name].append(elapsed)
                    tokens[name] += int(split.lengths[indices].sum())
        rows = []
        for name in engines:
            median = statistics.median(times[name])
            per_step = tokens[name] / len(times[name])
            rows.append((name, median, per_step / median, times[name]))
        return rows, first_loss


def main():
    args = parse_args()
    warnings.simplefilter("ignore")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import transformers
        have_hf, hf_version = True, transformers.__version__
        transformers.logging.set_verbosity_error()
    except ImportError:
        have_hf, hf_version = False, "not installed"
    print(f"GPT-2 117M training step on {device} ({torch.get_num_threads()} threads), "
          f"{args.precision}, AdamW lr 1e-4 wd 0.01, clip 1.0; torch {torch.__version__}, "
          f"transformers {hf_version}; HF optimizer: "
          f"{args.hf_optimizer}; median of {args.rounds} interleaved steps")
    print(f"{'scenario':<22} {'engine':<6} {'step s':>8} {'tokens/s':>10} {'vs hf':>7}   "
          f"first loss   all step times (s)")
    results = []
    for scenario in args.scenarios.split(","):
        rows, first_loss = run_scenario(scenario, args, device, have_hf)
        label = {"full": "full (4 x 128)", "short": "short (4 toy lines)"}[scenario]
        hf_rate = dict((r[0], r[2]) for r in rows).get("hf")
        for name, median, rate, all_times in rows:
            ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
            print(f"{label:<22} {name:<6} {median:>8.3f} {rate:>10,.0f} {ratio:>7}   "
                  f"{first_loss[name]:.5f}    {' '.join(f'{t:.2f}' for t in all_times)}")
            results.append({"scenario": scenario, "engine": name, "step_s": median,
                            "tok_s": rate, "first_loss": first_loss[name],
                            "precision": args.precision, "device": str(device)})
        sys.stdout.flush()
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
