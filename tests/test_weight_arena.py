"""A frozen model's weights moved into one huge-page block in decoding order
(utils/decoding/weight_arena.py, utils/decoding/engine.py's pack_for_decoding)."""
import copy

import pytest
import torch

from utils.decoding import weight_arena
from utils.decoding.generation import forward_logits, generate
from utils.decoding.engine import (decoding_order, engine_for, pack_for_decoding,
                                   prepare_for_decoding)
from utils.model import build_model, gpt2_hparams

NEVER = -1
needs_huge_pages = pytest.mark.skipif(not weight_arena.huge_pages_available(),
                                      reason="no transparent huge pages on this system")


def small_model(seed=3, with_memory=False):
    torch.manual_seed(seed)
    return build_model(gpt2_hparams(n_vocab=300, n_ctx=40, n_embd=32, n_head=4,
                                    n_layer=2), with_memory=with_memory).eval()


def frozen_copy(model):
    return copy.deepcopy(model).requires_grad_(False)


def arena_storage(model):
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@needs_huge_pages
def test_packing_keeps_values_parameters_and_tying():
    model = small_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = list(model.parameters())
    model.requires_grad_(False)
    assert pack_for_decoding(model)
    assert list(model.parameters()) == params  # the same Parameter objects
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert len(arena_storage(model)) == 1  # one block holds every weight
    # The output layer is still the token embedding, not a copy of it.
    assert model.decoder._output_layer.weight is model.word_embedder.embedding


@needs_huge_pages
def test_packed_qkv_is_a_view_and_ids_are_unchanged():
    model = small_model()
    reference = copy.deepcopy(model)  # requires grad: not packed, Q/K/V copied
    packed = frozen_copy(model)
    net = prepare_for_decoding(packed)
    assert net.extra_bytes() == 0
    attn = packed.decoder.self_attns[0]
    assert net.layers[0].qkv.weight.data_ptr() == attn.Q_dense.weight.data_ptr()
    assert engine_for(reference).extra_bytes() > 0
    prompts = [[1, 2, 3, 4], [5, 6]]
    for context in prompts:
        assert (generate(packed, [context], 30, strategy="greedy", end_token=NEVER)
                == generate(reference, [context], 30, strategy="greedy", end_token=NEVER))
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    assert torch.equal(forward_logits(packed, ids), forward_logits(reference, ids))


@needs_huge_pages
def test_a_packed_model_is_not_copied_again():
    model = frozen_copy(small_model())
    prepare_for_decoding(model)
    where = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        model.decoder.self_attns[0].O_dense.weight.mul_(0.5)  # in place: engine rebuilt
    net = engine_for(model)
    assert [p.data_ptr() for p in model.parameters()] == where
    # The fused Q/K/V view sees in-place changes to Q, K and V as well.
    with torch.no_grad():
        model.decoder.self_attns[1].K_dense.weight.zero_()
    net = engine_for(model)
    assert net.layers[1].qkv.weight[32:64].abs().sum() == 0


@needs_huge_pages
def test_packing_under_inference_mode_leaves_a_trainable_model():
    model = frozen_copy(small_model())
    with torch.inference_mode():
        prepare_for_decoding(model)
    model.requires_grad_(True).train()
    out = model(inputs=torch.tensor([[1, 2, 3]]), decoding_strategy="train_greedy")
    out.logits.sum().backward()
    assert model.word_embedder.embedding.grad is not None


@needs_huge_pages
def test_parameters_decoding_does_not_read_are_packed_last():
    model = frozen_copy(small_model(with_memory=True))
    order = decoding_order(model)
    listed = [p for group in order for p in group]
    assert len(listed) == len(list(model.parameters()))
    assert pack_for_decoding(model)
    assert len(arena_storage(model)) == 1


def test_building_an_engine_never_moves_the_model():
    model = frozen_copy(small_model())
    where = [p.data_ptr() for p in model.parameters()]
    engine_for(model)  # a lookup: packing is prepare_for_decoding's job
    assert [p.data_ptr() for p in model.parameters()] == where


def test_trainable_or_unsupported_models_stay_where_they_are(monkeypatch):
    model = small_model()
    where = [p.data_ptr() for p in model.parameters()]
    assert not pack_for_decoding(model)  # requires grad
    assert [p.data_ptr() for p in model.parameters()] == where
    monkeypatch.setattr(weight_arena, "huge_pages_available", lambda: False)
    frozen = frozen_copy(model)
    where = [p.data_ptr() for p in frozen.parameters()]
    assert not pack_for_decoding(frozen)
    assert [p.data_ptr() for p in frozen.parameters()] == where
    net = engine_for(frozen)  # still decodes, with a fused Q/K/V copy
    assert net.extra_bytes() > 0


def test_pack_parameters_refuses_what_it_cannot_move():
    a = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError):
        weight_arena.pack_parameters([[a]])  # requires grad
    b = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError):
        weight_arena.pack_parameters([[b], [b]])
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    with pytest.raises(ValueError):
        weight_arena.pack_parameters([[b, c]])


def test_joined_needs_back_to_back_tensors():
    block = torch.arange(10.0)
    assert torch.equal(weight_arena.joined([block[:4], block[4:10]]), block)
    assert weight_arena.joined([block[:4], block[5:10]]) is None  # a gap
    assert weight_arena.joined([block[4:], block[:4]]) is None  # out of order
    assert weight_arena.joined([torch.ones(2), torch.ones(2)]) is None  # two storages


@needs_huge_pages
def test_empty_gives_a_usable_tensor():
    t = weight_arena.empty((2, 3, 5), torch.float32)
    t.fill_(1.5)
    assert t.shape == (2, 3, 5) and t.dtype == torch.float32 and float(t.sum()) == 45.0


def in_huge_page_memory(tensor) -> bool:
    """Whether the mapping holding `tensor` is advised MADV_HUGEPAGE (the `hg`
    of its VmFlags in /proc/self/smaps; THPeligible would also depend on
    whether the mapping happens to span an aligned 2 MiB range, which a tiny
    model's does not always)."""
    address = tensor.data_ptr()
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:  # a mapping's header line
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


@needs_huge_pages
@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("long_session", [True, False])
def test_only_a_long_session_loads_into_huge_pages(dtype, long_session):
    """A huge page's first touch can wait on the kernel's compaction: a short
    run keeps ordinary pages, a long one (interactive, many tokens, a server)
    huge ones; both lay the weights out in one block (Q, K and V one tensor,
    nothing copied for the engine). Same ids either way."""
    from user_files import TINY_A
    from utils.checkpoints.weights import resolve_model
    from utils.decoding.loading import load_for_decoding
    resolved = resolve_model(pretrain_model_dir=TINY_A, download=False)
    model, _ = load_for_decoding(resolved, dtype, torch.device("cpu"), long_session)
    embedding = model.word_embedder.embedding
    assert all(p.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()
               for p in model.parameters() if p.device.type == "cpu")
    assert in_huge_page_memory(embedding) == long_session
    if dtype == "float32":
        assert engine_for(model).extra_bytes() == 0
    plain, _ = load_for_decoding(resolved, dtype, torch.device("cpu"), not long_session)
    assert (generate(model, [[1, 2, 3]], 12, strategy="greedy", end_token=NEVER)
            == generate(plain, [[1, 2, 3]], 12, strategy="greedy", end_token=NEVER))
