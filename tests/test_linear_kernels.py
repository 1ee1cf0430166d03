"""Which kernel a product of the generation engine runs through
(utils/decoding/linear.py): on Intel CPUs products of a few rows go to MKL
(F.linear) and larger ones to oneDNN; elsewhere all go to oneDNN. Either way
the product is the same one, within float32 rounding of its sums."""
import pytest
import torch
import torch.nn.functional as F

from utils.decoding import linear

IN, OUT = 64, 48


def float32_bound(x, weight):
    """A bound on float32 rounding in x @ W^T: each sum of `IN` products can be
    off by about IN * eps times the sum of the products' magnitudes."""
    return IN * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().T)


@pytest.fixture
def onednn_calls(monkeypatch):
    if not linear.uses_onednn(torch.device("cpu"), torch.float32):
        pytest.skip("this PyTorch's oneDNN linear is missing or disagrees with F.linear")
    rows_seen = []
    real = linear.onednn_linear

    def counting(x, weight, bias=None):
        rows_seen.append(x.numel() // x.size(-1))
        return real(x, weight, bias)
    monkeypatch.setattr(linear, "onednn_linear", counting)
    return rows_seen


@pytest.mark.parametrize("vendor, onednn_from", [("GenuineIntel", linear.ONEDNN_MIN_ROWS_ON_INTEL),
                                                 ("AuthenticAMD", 1), ("", 1)])
def test_few_rows_go_to_mkl_on_intel_only(monkeypatch, onednn_calls, vendor, onednn_from):
    monkeypatch.setattr(linear, "cpu_vendor", lambda: vendor)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    layer = linear.PreparedLinear([weight], [bias])
    for rows in range(1, 7):
        x = torch.randn(rows, 1, IN, generator=g)
        y = layer(x)
        exact = F.linear(x.double(), weight.double(), bias.double())
        assert ((y.double() - exact).abs() <= float32_bound(x, weight) + 1e-12).all()
    assert onednn_calls == [rows for rows in range(1, 7) if rows >= onednn_from]


def test_other_devices_and_vendors_start_onednn_at_one_row(monkeypatch):
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "GenuineIntel")
    assert linear.onednn_min_rows(torch.device("cpu")) == linear.ONEDNN_MIN_ROWS_ON_INTEL
    assert linear.onednn_min_rows(torch.device("meta")) == 1
    monkeypatch.setattr(linear, "cpu_vendor", lambda: "AuthenticAMD")
    assert linear.onednn_min_rows(torch.device("cpu")) == 1


def test_the_cpu_vendor_is_read_from_the_system():
    from utils.device import cpu_vendor
    vendor = cpu_vendor()
    assert isinstance(vendor, str)
    try:
        with open("/proc/cpuinfo") as info:
            named = [line.split(":", 1)[1].strip() for line in info
                     if line.startswith("vendor_id")]
    except OSError:
        named = []
    assert vendor == (named[0] if named else "")
