"""The CUDA paths: generation on the GPU, fp16/bf16 autocast training, NCCL
under torchrun with one GPU. Marked `cuda` and skipped without a CUDA GPU;
scripts/gpu_check.sh runs them (pytest -m cuda) on a GPU machine."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from utils.decoding.generation import generate

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEVER = -1


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_greedy_on_cuda_equals_the_transformers_reference(name, tf_gpt2_model):
    model, meta = tf_gpt2_model(name)
    model = model.cuda()
    cases = meta["greedy"]
    prompts = [c["prompt_ids"] for c in cases]
    ours = generate(model, prompts, meta["hparams"]["n_ctx"], strategy="greedy",
                    end_token=NEVER)
    for case, row in zip(cases, ours):
        assert case["prompt_ids"] + row == case["output_ids"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generation_on_cuda(dtype, tf_gpt2_model):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model, meta = tf_gpt2_model("tiny_a")
    model = model.to(device="cuda", dtype=dtype)
    prompts = [c["prompt_ids"] for c in meta["greedy"]]
    out = generate(model, prompts, 20, strategy="sample", top_k=40, end_token=NEVER,
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert [len(r) for r in out] == [20 - len(p) for p in prompts]
    assert all(0 <= t < 50257 for row in out for t in row)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from utils.data.prepare import prepare_split
    root = tmp_path_factory.mktemp("cuda_job")
    for split in ("train", "dev", "test"):
        prepare_split(os.path.join(REPO, "data", "toy", f"{split}.txt"),
                      str(root / "data" / f"{split}.npy"), max_seq_length=32,
                      vocab_dir=None, num_workers=1, progress=False)
    (root / "model_cfg.py").write_text(
        "from utils.model import gpt2_hparams\nhparams = gpt2_hparams(50257, 64, 32, 2, 2)\n")
    for precision in ("fp32", "fp16", "bf16"):
        (root / f"train_{precision}.py").write_text(
            f"from configs.config_train import *  # noqa\n"
            f"data_dir = {str(root / 'data')!r}\nmax_seq_length = 32\n"
            f"train_batch_size = 8\neval_batch_size = 8\nmax_train_epoch = 1\n"
            f"display_steps = 1\neval_steps = -1\ncheckpoint_steps = -1\n"
            f"precision = {precision!r}\nseed = 1\n")
    return root


def train(job, precision, out, launcher=()):
    cmd = [*launcher, "gpt2_train_main.py", "--do_train", "--from_scratch",
           "--config_model", str(job / "model_cfg.py"),
           "--config_train", str(job / f"train_{precision}.py"),
           "--output_dir", str(job / out), "--quiet"]
    if launcher:
        cmd.append("--distributed")
    result = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with open(job / out / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    return result.stdout, losses


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_training_follows_fp32(job, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _, reference = train(job, "fp32", "fp32_" + precision)
    _, losses = train(job, precision, precision)
    assert losses and all(math.isfinite(x) for x in losses)
    assert len(losses) == len(reference)
    # The same data and seed: half-precision arithmetic moves the losses a little.
    assert all(abs(a - b) < 0.05 * abs(b) + 0.05 for a, b in zip(losses, reference))


def test_torchrun_nccl_with_one_gpu(job):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                "--max_restarts", "0")
    out, losses = train(job, "fp32", "nccl", launcher)
    assert "(nccl)" in out, out[-2000:]
    _, single = train(job, "fp32", "single")
    assert losses == pytest.approx(single, rel=1e-4, abs=1e-4)
