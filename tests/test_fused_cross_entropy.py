"""utils/training/fused_cross_entropy.py against torch's F.cross_entropy (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from utils.training import fused_cross_entropy
from utils.training.fused_cross_entropy import cross_entropy_sum

IGNORE = -100


def case(rows=37, vocab=50257, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::5] = IGNORE  # padding and source tokens
    return logits, targets


def reference(logits, targets):
    """F.cross_entropy in float64: value and gradient."""
    exact = logits.detach().double().requires_grad_(True)
    value = F.cross_entropy(exact, targets, ignore_index=IGNORE, reduction="sum")
    value.backward()
    return value.detach(), exact.grad


def tolerance(dtype, reduction, magnitude):
    """A few units of rounding per term of the longest sum, at the values' size."""
    return 4 * torch.finfo(dtype).eps * reduction * max(magnitude, 1.0)


@pytest.mark.parametrize("chunk_rows", [256, 8])  # one chunk; chunk edges mid-batch
def test_value_and_gradient_equal_cross_entropy(monkeypatch, chunk_rows):
    monkeypatch.setattr(fused_cross_entropy, "CHUNK_ROWS", chunk_rows)
    logits, targets = case()
    ref_value, ref_grad = reference(logits, targets)
    logits.requires_grad_(True)
    value = cross_entropy_sum(logits, targets, IGNORE)
    (2.5 * value).backward()  # an upstream gradient other than 1
    vocab, rows = logits.size(1), logits.size(0)
    assert value.dtype == torch.float32
    assert abs(float(value.detach()) - float(ref_value)) <= tolerance(
        torch.float32, vocab + rows, float(ref_value) / rows)
    assert (logits.grad.double() - 2.5 * ref_grad).abs().max() <= tolerance(
        torch.float32, vocab, 2.5)
    assert torch.equal(logits.grad[::5], torch.zeros_like(logits.grad[::5]))  # ignored rows
    # The same as torch's own float32 cross_entropy, too.
    torch_value = F.cross_entropy(logits.detach(), targets, ignore_index=IGNORE,
                                  reduction="sum")
    assert abs(float(value.detach()) - float(torch_value)) <= tolerance(
        torch.float32, vocab + rows, float(ref_value) / rows)


def test_bfloat16_logits_as_autocast_computes_them():
    logits, targets = case(rows=12, dtype=torch.bfloat16, seed=1)
    ref_value, ref_grad = reference(logits, targets)  # from the same bf16 values
    logits.requires_grad_(True)
    value = cross_entropy_sum(logits, targets, IGNORE)
    value.backward()
    assert value.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert abs(float(value.detach()) - float(ref_value)) <= tolerance(
        torch.float32, logits.size(1), float(ref_value) / 12)
    # The gradient is rounded to bfloat16 once.
    assert (logits.grad.double() - ref_grad).abs().max() <= torch.finfo(torch.bfloat16).eps


def test_every_target_ignored_gives_zero_and_no_gradient():
    logits = torch.randn(4, 100, requires_grad=True)
    value = cross_entropy_sum(logits, torch.full((4,), IGNORE), IGNORE)
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(4, 100))
