"""utils/checkpoints/streamed_save.py: a checkpoint written tensor by tensor is
the file torch.save writes (read back equal, with and without mmap, a valid
zip), asks for each tensor once, in the same order with or without writing,
and never holds two of the tensors it asks for at once."""
import collections
import weakref
import zipfile

import pytest
import torch

from utils.checkpoints.streamed_save import save_streamed, tensors_in_order


def training_like_state():
    """A checkpoint's shapes of trouble: same-shape weights (a swap would go
    unnoticed by sizes), a tensor stored twice, scalars, bf16, bool, empty,
    tuples, ints as keys, plain values."""
    torch.manual_seed(0)
    shared = torch.randn(5, 4)
    model = collections.OrderedDict(
        [(f"w{i}", torch.randn(4, 4)) for i in range(4)] + [("tied", shared),
                                                            ("emb", shared)])
    return {"format": "x", "model": model,
            "optimizer": {"state": {i: {"step": torch.tensor(float(i + 1)),
                                        "exp_avg": torch.randn(4, 4)} for i in range(3)},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99),
                                            "params": [0, 1, 2]}]},
            "rng": [torch.randint(0, 255, (7,), dtype=torch.uint8), (3, None)],
            "half": torch.randn(3, dtype=torch.bfloat16), "empty": torch.empty(0, 4),
            "mask": torch.tensor([True, False, True]), "step": 3}


def assert_same(a, b):
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b)
        return
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


class Gatherer:
    """materialize() that makes a new tensor per call (as a gather does) and
    measures how many bytes of the tensors it made are alive together."""

    def __init__(self):
        self.made = []  # weak references: a kept tensor stays alive
        self.asked = []
        self.peak_bytes = 0

    def __call__(self, tensor):
        full = tensor.clone()
        self.asked.append(tensor)
        self.made.append(weakref.ref(full))
        alive = sum(t.numel() * t.element_size() for t in (r() for r in self.made)
                    if t is not None)
        self.peak_bytes = max(self.peak_bytes, alive)
        return full


@pytest.mark.parametrize("mmap", [False, True])
def test_streamed_checkpoint_is_torch_save_of_the_state(tmp_path, mmap):
    state = training_like_state()
    gather = Gatherer()
    save_streamed(str(tmp_path / "s.ckpt"), state, gather)
    torch.save(state, str(tmp_path / "ref.ckpt"))
    loaded = torch.load(str(tmp_path / "s.ckpt"), weights_only=True, mmap=mmap)
    assert_same(loaded, torch.load(str(tmp_path / "ref.ckpt"), weights_only=True))
    # One storage for a tensor stored twice, as torch.save keeps it.
    assert loaded["model"]["tied"].data_ptr() == loaded["model"]["emb"].data_ptr()
    with zipfile.ZipFile(tmp_path / "s.ckpt") as archive:
        assert archive.testzip() is None  # every record's CRC-32 is right


def test_one_tensor_at_a_time_in_one_order(tmp_path):
    state = training_like_state()
    writing, silent = Gatherer(), Gatherer()
    save_streamed(str(tmp_path / "s.ckpt"), state, writing)
    save_streamed(str(tmp_path / "none.ckpt"), state, silent, write=False)
    distinct = tensors_in_order(state)
    assert [id(t) for t in writing.asked] == [id(t) for t in distinct]
    assert [id(t) for t in silent.asked] == [id(t) for t in distinct]
    assert not (tmp_path / "none.ckpt").exists()
    # Never two at once: the peak is the largest single tensor, not a sum.
    assert writing.peak_bytes == max(t.numel() * t.element_size() for t in distinct)


def test_a_wrong_tensor_leaves_no_file(tmp_path):
    path = tmp_path / "s.ckpt"
    with pytest.raises(ValueError, match="materialize gave"):
        save_streamed(str(path), {"a": torch.ones(3)}, lambda t: torch.ones(4))
    assert list(tmp_path.iterdir()) == []
