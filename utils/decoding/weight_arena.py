"""A frozen model's weights moved into one block of huge-page memory, in the
order decoding reads them.

Decoding one row reads every weight once per token: a stream of about 500 MB
per token for GPT-2 124M in float32. Spread over 4 KiB pages that stream
misses the TLB every 4 KiB; in 2 MiB pages it does not, and the matrix-vector
products ran 3-17% faster (median about 9%) in paired runs on the 2-core dev
machine (`python benchmarks/bench_arena.py` repeats the measurement).

Linux backs an anonymous mapping with transparent huge pages when it is
advised MADV_HUGEPAGE and /sys/kernel/mm/transparent_hugepage/enabled says
`madvise` or `always`. Elsewhere `pack_parameters` returns None and the
weights stay where they are.

Packing moves each parameter's storage (`param.data = view`): the values and
the Parameter objects stay the same, and each old storage is freed as soon as
its copy is made, so the peak is the model plus one parameter, not two models.
Tensors given as one group are placed back to back, so the concatenation of
Q, K and V is a view of the block, not a copy.
"""
import functools
import math
import mmap
from typing import List, Optional, Sequence, Tuple

import torch

HUGE_PAGE = 2 * 1024 * 1024
ALIGN = 64  # bytes between groups: each starts on a cache line
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=None)
def huge_pages_available() -> bool:
    """Whether this system gives huge pages to memory advised to use them."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux
        return False
    try:
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _fresh_block(nbytes: int, huge_pages: bool = True) -> torch.Tensor:
    """`nbytes` of fresh memory as uint8, starting on a huge-page boundary, and
    advised to use huge pages with `huge_pages` (callers check
    huge_pages_available first)."""
    # Nothing in the fresh mapping has been touched yet, so every page the
    # first writes fault in can be a huge one; the extra page aligns the start.
    block = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages:
        block.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(block, dtype=torch.uint8)  # keeps `block` alive
    base = (-arena.data_ptr()) % HUGE_PAGE
    return arena[base:base + nbytes]


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on the CPU, in huge pages where available (the KV cache,
    read whole at every step like the weights)."""
    if not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    return _fresh_block(math.prod(shape) * dtype.itemsize).view(dtype).view(tuple(shape))


def joined(group: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The group's tensors as one flat tensor when they already lie back to
    back in one storage (contiguous, one dtype, in order); else None."""
    first = group[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in group:
        if (not t.is_contiguous() or t.dtype != first.dtype
                or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(storage, first.storage_offset(), (offset - first.storage_offset(),))


def _already_packed(groups: Sequence[Sequence[torch.Tensor]]) -> bool:
    views = [joined(g) for g in groups]
    return (all(v is not None for v in views)
            and len({v.untyped_storage().data_ptr() for v in views}) == 1)


def pack_parameters(groups: Sequence[Sequence[torch.nn.Parameter]]
                    ) -> Optional[List[torch.Tensor]]:
    """Move the parameters into one huge-page block, group after group, and
    return each group as one flat tensor (a view of the block).

    Every parameter must be on the CPU, appear once, and not require grad
    (moving a trained model's storage under its optimizer is not done here);
    a group's tensors share one dtype. Returns None where huge pages are not
    available. Packing an already packed model copies nothing.
    """
    params = [p for g in groups for p in g]
    if len({id(p) for p in params}) != len(params):
        raise ValueError("a parameter is listed twice")
    if any(p.device.type != "cpu" or p.requires_grad for p in params):
        raise ValueError("only frozen CPU parameters can be packed")
    if any(len({p.dtype for p in g}) != 1 for g in groups):
        raise ValueError("a group mixes dtypes")
    if not huge_pages_available():
        return None
    if _already_packed(groups):
        return [joined(g) for g in groups]

    views = allocate([[(p.shape, p.dtype) for p in g] for g in groups])
    # Plain tensors even when called under inference mode: the model may be
    # unfrozen and trained later.
    with torch.inference_mode(False), torch.no_grad():
        for g, g_views in zip(groups, views):
            for p, view in zip(g, g_views):
                view.copy_(p)
                p.data = view  # the old storage goes now, not at the end
    return [joined(g) for g in groups]


def allocate(groups: Sequence[Sequence[Tuple[Sequence[int], torch.dtype]]],
             huge_pages: bool = True) -> List[List[torch.Tensor]]:
    """One block laid out for `groups` of (shape, dtype): a view of the block
    for each, contents unset, a group's tensors back to back and each group
    starting on a cache line. In huge pages with `huge_pages` (callers check
    huge_pages_available), else in ordinary ones (the layout still makes
    Q, K and V one tensor). A loader fills the views directly: the weights
    land in place, once."""
    starts, end = [], 0
    for g in groups:
        end = -(-end // ALIGN) * ALIGN
        starts.append(end)
        end += sum(math.prod(shape) * dtype.itemsize for shape, dtype in g)
    with torch.inference_mode(False):
        arena = _fresh_block(end, huge_pages)
        views = []
        for g, start in zip(groups, starts):
            pos, g_views = start, []
            for shape, dtype in g:
                n = math.prod(shape) * dtype.itemsize
                g_views.append(arena[pos:pos + n].view(dtype).view(tuple(shape)))
                pos += n
            views.append(g_views)
    return views
