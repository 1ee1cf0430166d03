"""--dtype int8: 8-bit linear layers for decoding (utils/decoding/int8_linear.py), and
the engine cache that holds prepared weights (utils/decoding/engine.py)."""
import os

import pytest
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.decoding.generation import forward_logits, generate
from utils.decoding.int8_linear import Int8Linear, int8_available, quantize_for_decoding, require_int8
from utils.model import build_model, gpt2_hparams
import script_server

pytestmark = pytest.mark.skipif(not int8_available(),
                                reason="this PyTorch build has no fbgemm int8 kernels")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf_gpt2")
NEVER = -1


def small_model(seed=7):
    torch.manual_seed(seed)
    return build_model(gpt2_hparams(n_vocab=50257, n_ctx=48, n_embd=64,
                                    n_head=4, n_layer=2)).eval()


def test_int8_linear_is_close_to_the_float_product():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(2, 5, 64, generator=g)
    exact = F.linear(x, w, b)
    approx = Int8Linear([w], [b])(x)
    assert approx.shape == exact.shape
    # 8-bit weights and activations: about 1% of the output's size.
    assert (approx - exact).norm() / exact.norm() < 0.02
    fused = Int8Linear([w[:32], w[32:]], [b[:32], b[32:]])(x)
    assert torch.equal(fused, approx)  # per-row scales: fusing changes nothing


@pytest.mark.parametrize("rows", [96, 97])  # an even and an odd split
def test_a_large_layer_packed_in_two_halves_gives_the_same_products(monkeypatch, rows):
    """The output layer is packed as two row halves on two threads; each output
    is the same integer product with the same scales, so nothing changes."""
    from utils.decoding import int8_linear
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(rows, 64, generator=g), torch.randn(rows, generator=g)
    x = torch.randn(3, 2, 64, generator=g)
    whole = Int8Linear([w], [b])
    monkeypatch.setattr(int8_linear, "SPLIT_PACKING_ROWS", 50)
    halves = Int8Linear([w], [b])
    assert len(whole.packed) == 1 and len(halves.packed) == 2
    assert torch.equal(halves(x), whole(x))
    assert halves.extra_bytes == whole.extra_bytes


def test_packing_on_worker_threads_changes_no_logit(monkeypatch):
    """The engine packs its int8 layers on PACKING_THREADS workers: one worker
    or two, the same packed layers and so the same logits."""
    from utils.decoding import int8_linear
    ids = torch.tensor([[464, 2068, 7586, 21831]])
    logits = []
    for threads in (1, 2):
        monkeypatch.setattr(int8_linear, "PACKING_THREADS", threads)
        model = quantize_for_decoding(small_model())
        logits.append(forward_logits(model, ids))
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_int8_logits_follow_float32_on_tf_checkpoints(name, tf_gpt2_model):
    model, meta = tf_gpt2_model(name)
    ids = torch.tensor([c["output_ids"] for c in meta["greedy"]])
    exact = forward_logits(model, ids)
    quantize_for_decoding(model)
    approx = forward_logits(model, ids)
    assert (approx - exact).norm() / exact.norm() < 0.05
    agree = (approx.argmax(-1) == exact.argmax(-1)).float().mean()
    assert agree > 0.9


def test_int8_greedy_runs_and_mostly_agrees_with_float32():
    model = small_model()
    contexts = [[464, 2068, 7586], [15496, 995, 11, 13]]
    exact = generate(model, contexts, 20, strategy="greedy", end_token=NEVER)
    quantize_for_decoding(model)
    approx = generate(model, contexts, 20, strategy="greedy", end_token=NEVER)
    assert [len(r) for r in approx] == [len(r) for r in exact]
    # The first token comes from the same prompt: a flip would need a near-tie.
    assert [r[0] for r in approx] == [r[0] for r in exact]


def test_engine_follows_weights_changed_after_first_use():
    """Prepared weights (fused Q/K/V, packed copies) are rebuilt when the
    model's parameters change in place, as training does."""
    model = small_model()
    contexts = [[1, 2, 3]]
    generate(model, contexts, 12, strategy="greedy", end_token=NEVER)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    changed = generate(model, contexts, 12, strategy="greedy", end_token=NEVER)
    fresh = small_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    assert changed == generate(fresh, contexts, 12, strategy="greedy", end_token=NEVER)
    assert torch.equal(forward_logits(model, torch.tensor(contexts)),
                       forward_logits(fresh, torch.tensor(contexts)))


def test_int8_refuses_other_devices_and_dtypes_in_one_line():
    with pytest.raises(UserError) as err:
        require_int8(torch.device("cuda"))
    assert "CPU only" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        quantize_for_decoding(small_model().to(torch.bfloat16))
    assert "float32" in str(err.value) and "\n" not in str(err.value)


def test_cli_dtype_int8_generates_from_a_tf_checkpoint():
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = os.path.join(FIXTURES, "models", "tiny_a")
    result = script_server.run(
        [sys.executable, "gpt2_generate_main.py", "--pretrain_model_dir", model_dir,
         "--pretrain_checkpoint", os.path.join(model_dir, "model.ckpt"),
         "--dtype", "int8", "--prompt", "Hello there", "--top_k", "1",
         "--max_decoding_length", "16"],
        capture_output=True, text=True, cwd=repo, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(int8)" in result.stderr and "SAMPLE" in result.stdout


def test_cli_int8_on_a_gpu_is_one_line():
    # int8 refuses CUDA; without a GPU here, --device cuda is refused first:
    # one line either way.
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = os.path.join(FIXTURES, "models", "tiny_a")
    result = subprocess.run(
        [sys.executable, "gpt2_generate_main.py", "--pretrain_model_dir", model_dir,
         "--dtype", "int8", "--device", "cuda", "--prompt", "Hi"],
        capture_output=True, text=True, cwd=repo, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize("scratch_rows", [None, 1000, 0])  # 0: shorter than a row
@pytest.mark.parametrize("layout", ["rows", "openai_transposed"])
def test_quantize_rows_equals_torch_quantize_per_channel(layout, scratch_rows):
    """Our vectorised per-row quantization gives torch's own int8 values and
    scales, ties (exact halves, rounded to even) and a zero row included,
    whether the matrix fits the working block or takes several."""
    import warnings

    from utils.decoding.int8_linear import quantize_rows
    torch.manual_seed(0)
    weight = torch.randn(2537, 96) * 0.02
    weight[1] = torch.arange(96) - 47.5  # scale 47.5 / 127: many values land on halves
    weight[2, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])
    weight[2, 8:] = 0
    weight[3] = 0
    if layout == "openai_transposed":
        weight = weight.t().contiguous().t()  # [out, in] view of an [in, out] tensor
    scratch = None if scratch_rows is None else torch.empty(scratch_rows * 96 + 5)
    values, scales = quantize_rows(weight, scratch)
    expected_scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.quantize_per_channel(
            weight, expected_scales, torch.zeros(weight.size(0), dtype=torch.long), 0,
            torch.qint8).int_repr()
    assert torch.equal(scales, expected_scales)
    assert torch.equal(values[2:4], expected[2:4])  # the exact halves and the zero row
    # Elsewhere too on the CPUs measured; a kernel of another CPU rounding a
    # product within an ulp of a half the other way would move one value by 1.
    differ = values.int() - expected.int()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 1e-4
    assert values.is_contiguous()
