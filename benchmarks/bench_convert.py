"""How much memory does convert_checkpoint.py need, next to converting whole dicts?

Builds a random GPT-2 of the 345M model's sizes (355M parameters, 1.42 GB in
float32; or --model), saves it as our .ckpt, then runs each conversion in its
own process and prints that process's peak resident memory (ru_maxrss, which
includes the pages of files it memory-maps) and its peak anonymous memory
(sampled), less the floor, as ratios to the model's float32 size:

- python + torch imported, nothing converted: the floor every row includes;
- ours, .ckpt -> hf and .ckpt -> openai: torch.load reads the whole .ckpt
  (one copy), the outputs are written tensor by tensor;
- ours, hf -> openai and openai -> hf: both ends streamed, one tensor at a time;
- ours, hf -> ckpt: one copy, the state dict torch.save writes;
- the alternative, .ckpt -> hf through whole dicts: torch.load, the whole
  Hugging Face state dict (texar_to_hf_state_dict), safetensors' save_file.

    python benchmarks/bench_convert.py [--model 345M] [--dir /tmp/bench_convert]
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def rss_anon_bytes() -> int:
    """Resident memory that is not a mapped file's pages (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The largest RssAnon seen, sampled every 2 ms by a thread: ru_maxrss also
    counts the pages of memory-mapped files read (safetensors and our TF
    reader map their files), which the kernel can drop at any time."""

    def __init__(self):
        import threading
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_anon_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_anon_bytes())


def child(mode: str, args) -> None:
    """One measurement, in this (fresh) process; prints {"peak": bytes}."""
    import torch  # noqa: F401  (the floor includes it)
    anon = AnonPeak()
    if mode == "build":
        from utils.model import build_model, hparams_from_sizes
        from utils.checkpoints.weights import (CHECKPOINT_FORMAT, RELEASED_SIZES,
                                               checkpoint_model_fields, save_checkpoint)
        hparams = hparams_from_sizes(RELEASED_SIZES[args[1]])
        save_checkpoint(args[0], {"model": build_model(hparams).state_dict(),
                                  "format": CHECKPOINT_FORMAT,
                                  **checkpoint_model_fields(hparams)})
    elif mode == "convert":
        import convert_checkpoint
        assert convert_checkpoint.main(args) == 0
    elif mode == "whole_dicts":
        from safetensors.torch import save_file
        from utils.checkpoints.hf_names import texar_to_hf_state_dict
        state = torch.load(args[0], map_location="cpu", weights_only=True)
        hf = texar_to_hf_state_dict(state["model"], state["model_sizes"]["n_layer"])
        del hf["lm_head.weight"]  # tied: save_file refuses shared tensors
        save_file({k: v.contiguous() for k, v in hf.items()}, args[1])
    print(json.dumps({"peak": peak_rss_bytes(), "anon": anon.stop()}))


def measure(mode: str, *args) -> int:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                          *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak"], result["anon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="345M", choices=("117M", "345M", "774M", "1558M"))
    parser.add_argument("--dir", default=None, help="scratch space (default: a temp dir)")
    args = parser.parse_args()
    from utils.model import parameter_count
    from utils.checkpoints.weights import RELEASED_SIZES
    model_bytes = 4 * parameter_count(RELEASED_SIZES[args.model])
    work = tempfile.mkdtemp(dir=args.dir)
    try:
        ckpt, hf, oa = (os.path.join(work, n) for n in ("model.ckpt", "hf", "openai"))
        measure("build", ckpt, args.model)
        rows = [
            ("python + torch, nothing converted", measure("floor")),
            ("ours: .ckpt -> hf", measure("convert", ckpt, hf, "--format", "hf")),
            ("ours: .ckpt -> openai", measure("convert", ckpt, oa, "--format", "openai")),
            ("ours: hf -> openai (streamed)",
             measure("convert", hf, oa + "2", "--format", "openai")),
            ("ours: openai -> hf (streamed)",
             measure("convert", oa, hf + "2", "--format", "hf")),
            ("ours: hf -> .ckpt", measure("convert", hf, ckpt + "2", "--format", "ckpt")),
            ("whole dicts: .ckpt -> hf (torch.load, dict, save_file)",
             measure("whole_dicts", ckpt, os.path.join(work, "whole.safetensors"))),
        ]
    finally:
        shutil.rmtree(work)
    floor, anon_floor = rows[0][1]
    print(f"GPT-2 {args.model}: {model_bytes / 2**30:.2f} GiB of float32 weights. Peak RSS "
          f"(ru_maxrss, mapped file pages included) and peak anonymous RSS, less the floor, "
          f"as multiples of the model's size:")
    print(f"{'conversion':56s} {'peak RSS':>10s} {'-floor':>7s} {'anon':>10s} {'-floor':>7s}")
    for name, (peak, anon) in rows:
        print(f"{name:56s} {peak / 2**30:6.2f} GiB {(peak - floor) / model_bytes:6.2f}x "
              f"{anon / 2**30:6.2f} GiB {(anon - anon_floor) / model_bytes:6.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
