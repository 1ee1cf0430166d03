#!/usr/bin/env bash
# On a CUDA machine: the tests that need CUDA (generation on the GPU, fp16/bf16
# autocast training, NCCL under torchrun with one GPU: pytest -m cuda), then
# generation and training benchmarks on the GPU against Hugging Face, summed up
# in one table. About 5 minutes on one GPU (each step has its own time limit,
# 10 minutes in all). Needs the test and benchmark packages:
#   bash scripts/setup.sh --test && .venv/bin/pip install -r requirements-bench.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "error: torch sees no CUDA GPU here: run this on a GPU machine (CPU tests: scripts/test.sh)" >&2
  exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0

echo "== 1/3 CUDA tests (pytest -m cuda)"
timeout 200 "$PY" -m pytest -q -m cuda tests/test_cuda.py tests/test_fused_attention.py | tee "$out/tests.txt" || status=1

echo "== 2/3 Generation on the GPU: ours vs Hugging Face (float32 and float16)"
for dtype in float32 float16; do
  timeout 100 "$PY" benchmarks/bench_generate.py --device cuda --engines ours,hf \
      --batch_sizes 1,16 --prompt_lengths 8,512 --new_tokens 64 --dtype "$dtype" \
      --json "$out/generate_$dtype.json" >/dev/null || status=1
done

echo "== 3/3 Training step on the GPU: ours vs Hugging Face (fp32; bf16 autocast also at long context)"
timeout 80 "$PY" benchmarks/bench_train.py --device cuda --scenarios full --rounds 5 \
    --precision fp32 --json "$out/train_fp32.json" >/dev/null || status=1
# Fused attention at 1 x 1024 and 4 x 512: tokens/s, peak memory, roofline share,
# with texar's original attention beside it.
timeout 150 "$PY" benchmarks/bench_train.py --device cuda --scenarios full,long,mid \
    --engines ours,texar,hf --rounds 5 --precision bf16 \
    --json "$out/train_bf16.json" >/dev/null || status=1

echo "== sharded training (shard_model, 2 GPUs, NCCL) and LoRA on the GPU"
# Tiny model on data/toy: a short sharded run from scratch (when 2 GPUs are
# present), then LoRA adapters trained on its weights (or on a 1-GPU run's).
"$PY" prepare_data.py --data_dir data/toy --quiet >/dev/null
cat > "$out/shard_cfg.py" <<'CFGEOF'
from configs.config_train_demo import *  # noqa: F401,F403
max_train_epoch = 1
eval_steps = -1
checkpoint_steps = -1
sample_steps = -1
shard_model = True
gradient_checkpointing = True
precision = "bf16"
CFGEOF
printf 'from configs.config_train_demo import *\nmax_train_epoch = 1\nsample_steps = -1\nlora = {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["attention", "mlp"]}\ngradient_checkpointing = True\n' > "$out/lora_cfg.py"
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 gpt2_train_main.py \
      --do_train --distributed --from_scratch --config_model configs.config_model_tiny \
      --config_train "$out/shard_cfg.py" --output_dir "$out/sharded" --quiet \
      | tail -n 2 | tee "$out/sharded.txt" || status=1
else
  echo "one GPU: the sharded 2-GPU run is skipped; a 1-GPU full run gives the LoRA base"
  sed 's/shard_model = True/shard_model = False/' "$out/shard_cfg.py" > "$out/full_cfg.py"
  timeout 300 "$PY" gpt2_train_main.py --do_train --from_scratch \
      --config_model configs.config_model_tiny --config_train "$out/full_cfg.py" \
      --output_dir "$out/sharded" --quiet | tail -n 2 || status=1
fi
timeout 300 "$PY" gpt2_train_main.py --do_train --do_eval --checkpoint "$out/sharded/model.ckpt" \
    --config_train "$out/lora_cfg.py" --output_dir "$out/lora" --quiet | tail -n 2 || status=1
timeout 120 "$PY" gpt2_generate_main.py --checkpoint "$out/lora/model.ckpt" --prompt "The" \
    --decoding_strategy greedy --max_decoding_length 20 || status=1

"$PY" - "$out" <<'PYEOF'
import glob, json, os, sys
import torch
out = sys.argv[1]
print(f"\nGPU check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
tests = open(os.path.join(out, "tests.txt")).read().strip().splitlines()
print("CUDA tests:", tests[-1] if tests else "did not run")
print(f"{'what':<34} {'ours':>12} {'hf':>12} {'ours/hf':>8}")
for path in sorted(glob.glob(os.path.join(out, "generate_*.json"))):
    data = json.load(open(path))
    cases = {}
    for r in data["results"]:
        if "error" not in r:
            cases.setdefault((r["batch"], r["prompt"]), {})[r["engine"]] = r["tok_s"]
    for (batch, prompt), rate in sorted(cases.items()):
        ours, hf = rate.get("ours"), rate.get("hf")
        label = f"generate {data['dtype']} b{batch} p{prompt} tok/s"
        print(f"{label:<34} {ours or 0:12.1f} {hf or 0:12.1f} "
              f"{(ours / hf if ours and hf else 0):8.2f}")
SHAPES = {"full": "4x128", "long": "1x1024", "mid": "4x512", "short": "toy"}
for path in sorted(glob.glob(os.path.join(out, "train_*.json"))):
    scenarios = {}
    for r in json.load(open(path)):
        scenarios.setdefault((r["precision"], r["scenario"]), {})[r["engine"]] = r
    for (precision, scenario), rows in scenarios.items():
        hf = rows.get("hf", {})
        for engine in ("ours", "texar"):
            mine = rows.get(engine)
            if not mine:
                continue
            name = "" if engine == "ours" else " (texar attn)"
            label = f"train {precision} {SHAPES[scenario]}{name} tok/s"
            print(f"{label:<34} {mine['tok_s']:12.0f} {hf.get('tok_s') or 0:12.0f} "
                  f"{mine.get('vs_hf') or 0:8.2f}")
            if mine.get("peak_bytes") and hf.get("peak_bytes"):
                label = f"train {precision} {SHAPES[scenario]}{name} peak MB"
                print(f"{label:<34} {mine['peak_bytes'] / 2**20:12.0f} "
                      f"{hf['peak_bytes'] / 2**20:12.0f} "
                      f"{mine['peak_bytes'] / hf['peak_bytes']:8.2f}")
            if mine.get("roofline"):
                label = f"train {precision} {SHAPES[scenario]}{name} roofline"
                print(f"{label:<34} {100 * mine['roofline']:11.0f}% "
                      f"{100 * (hf.get('roofline') or 0):11.0f}%")
PYEOF
exit "$status"
