"""8-bit linear layers for decoding (`--dtype int8`), built at load time.

Each linear layer's float32 weight is quantized per output channel to int8
(symmetric, scale = max |w| / 127) and packed once for fbgemm, PyTorch's x86
int8 matrix library; at run time `quantized.linear_dynamic` quantizes each
activation row block to 8 bits on the fly, multiplies in integers and returns
float32. Decoding reads a quarter of float32's weight bytes, which is what a
batch-1 step is bound by. Layer norms, attention, the embeddings and the KV
cache stay float32; the output layer (tied to the word embedding) gets its own
int8 copy, the largest single saving.

A model quantized after loading keeps its float32 parameters (the embedding
lookups and any later float32 use read them), so memory grows by about a
quarter of the weights. A model loaded for int8 decoding from a file
(utils/decoding/load_targets.py) has its linear weights quantized tensor by
tensor as they arrive and never holds them in float32: the embeddings, layer
norms and biases stay float32, the rest is int8.
"""
import collections
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from utils.errors import UserError
from utils.heap import threads_share_one_heap

INT8_FIX = "use --dtype float32 or bfloat16"


def int8_available() -> bool:
    """Whether this PyTorch build has the x86 int8 kernels (fbgemm)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def require_int8(device: torch.device) -> None:
    if device.type != "cpu":
        raise UserError(f"--dtype int8 runs on the CPU only (this run is on "
                        f"{device.type}): use --device cpu or {INT8_FIX}")
    if not int8_available():
        raise UserError(f"this PyTorch build has no int8 CPU kernels (fbgemm): "
                        f"{INT8_FIX}")


# float32 elements of a quantization's working block (16 MiB): whole rows of
# the weight, however large the matrix (the output layer is 50257 rows).
QUANTIZE_BLOCK = 4 * 1024 * 1024


def quantization_scratch() -> torch.Tensor:
    """A working block for quantize_rows, to pass to every call of a load:
    one block kept for the whole load frees nothing large between the int8
    weights it keeps, so glibc never raises its mmap threshold and serves
    the next large blocks from holes between them (a 1558M int8 load peaked
    near 3.9 GB with a fresh block per call, 2.2 GB with one)."""
    return torch.empty(QUANTIZE_BLOCK)


# Stored rows of a transposed weight quantized per pass: their int8 values
# are written transposed from a block this small (in cache) at 2x the speed
# of transposing the whole int8 matrix afterwards.
TRANSPOSE_TILE = 64


def quantize_rows(weight: torch.Tensor, scratch: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float64 scales) of `weight` [out, in], symmetric per
    output row: scale = max |w| / 127, value = w * (1 / scale) rounded half to
    even, exactly as torch.quantize_per_channel computes them (a test holds
    the two equal), in a few vectorised passes through `scratch`
    (quantization_scratch(); a new one when None), a block at a time: no
    float temporary of the whole matrix. A transposed view (OpenAI's [in, out]
    layout) is read as it lies in memory, by its stored rows (strided reads
    were 3-11x slower); only the int8 result is laid out [out, in]."""
    if scratch is None:
        scratch = quantization_scratch()
    transposed = weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()
    stored = weight.t() if transposed else weight
    if stored.size(1) > scratch.numel():  # a row longer than the scratch
        scratch = torch.empty(stored.size(1))
    with torch.no_grad():
        if transposed:
            values, scale = _quantize_columns(stored, scratch)
        else:
            values, scale = _quantize_rows(stored, scratch)
    return values, scale.double()


def _quantize_rows(weight: torch.Tensor, scratch: torch.Tensor):
    """quantize_rows for a weight whose rows lie contiguous in memory."""
    block = scratch.numel() // weight.size(1)
    values = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.size(0))
    for start, rows, work in _blocks(weight, block, scratch):
        end = start + rows.size(0)
        scale[start:end] = (torch.abs(rows, out=work).amax(dim=1) / 127.0).clamp_(min=1e-12)
        torch.mul(rows, scale[start:end].reciprocal()[:, None], out=work).round_().clamp_(-128, 127)
        values[start:end] = work
    return values, scale


def _quantize_columns(stored: torch.Tensor, scratch: torch.Tensor):
    """quantize_rows for the transpose of `stored` [in, out] (contiguous):
    the scales are maxima over its columns, and the int8 values are written
    [out, in] a tile of stored rows at a time."""
    block = scratch.numel() // stored.size(1)
    amax = torch.zeros(stored.size(1))
    for _, rows, work in _blocks(stored, block, scratch):
        torch.maximum(amax, torch.abs(rows, out=work).amax(dim=0), out=amax)
    scale = (amax / 127.0).clamp_(min=1e-12)
    inverse = scale.reciprocal()[None, :]
    values = torch.empty(stored.size(1), stored.size(0), dtype=torch.int8)
    for start, rows, work in _blocks(stored, min(block, TRANSPOSE_TILE), scratch):
        torch.mul(rows, inverse, out=work).round_().clamp_(-128, 127)
        values[:, start:start + rows.size(0)] = work.t()
    return values, scale


def _blocks(stored: torch.Tensor, block: int, scratch: torch.Tensor):
    """(first row, rows, work) for each `block` rows of `stored` in float32,
    `work` being a same-shaped view of `scratch`."""
    block = max(1, block)
    for start in range(0, stored.size(0), block):
        rows = stored[start:start + block].detach().float()
        yield start, rows, scratch[:rows.numel()].view(rows.shape)


def quantized_tensor(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_rows' pair as one per-channel qint8 tensor (what fbgemm packs)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated, still work
        warnings.simplefilter("ignore")
        return torch._make_per_channel_quantized_tensor(
            values, scales, torch.zeros_like(scales, dtype=torch.long), 0)


# fbgemm packs a matrix on one thread, at ~5-10 ns an element: 0.5-1 s of a
# 124M int8 start-up, ~10 s of 1558M's. PackingPool spreads an engine's
# matrices over two threads.
PACKING_THREADS = 2
# A matrix of at least this many rows (the output layer: 50257) is packed as
# two row halves, run as two products (as fast as one).
SPLIT_PACKING_ROWS = 16384


class PackingPool:
    """Packs matrices for fbgemm on PACKING_THREADS worker threads. The
    quantized tensor each one packs is made on the calling thread, at most one
    per worker ahead, so that the workers allocate nothing but the packed
    matrices they hand back, and on the heap the main thread uses
    (utils/heap.py), into the holes the load's freed int8 weights left."""

    def __init__(self):
        threads_share_one_heap()  # see utils/heap.py
        self._threads = PACKING_THREADS
        self._workers = ThreadPoolExecutor(max_workers=self._threads)
        self._in_flight = collections.deque()

    def pack(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> Future:
        """A future of the packed matrix of quantize_rows' pair and `bias`."""
        while len(self._in_flight) >= self._threads:
            self._in_flight.popleft().result()
        job = self._workers.submit(_prepack, quantized_tensor(values, scales), bias)
        self._in_flight.append(job)
        return job

    def __enter__(self) -> "PackingPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self._workers.shutdown(wait=True)


def _prepack(q: torch.Tensor, bias: torch.Tensor):
    with warnings.catch_warnings():  # quantized tensors are deprecated, still work
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack(q, bias)


def _pack_parts(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                pool: PackingPool) -> List[Future]:
    """Futures of the packed matrix: one, or two row halves when it is large."""
    rows = values.size(0)
    parts = ([slice(None)] if rows < SPLIT_PACKING_ROWS
             else [slice(0, rows // 2), slice(rows // 2, rows)])
    return [pool.pack(values[part], scales[part], bias[part]) for part in parts]


class Int8Linear:
    """y = act(x W^T + b) with W in int8 (one scale per output row).

    `weights` are float tensors, or (int8 values, scales) pairs already made
    by `quantize_rows` (a model quantized as it loaded,
    utils/decoding/load_targets.py)."""

    def __init__(self, weights: Sequence, biases: Sequence[torch.Tensor],
                 gelu: bool = False, activation=None,
                 packing: Optional[PackingPool] = None):
        if any(isinstance(w, tuple) for w in weights):
            parts = [w if isinstance(w, tuple) else quantize_rows(w) for w in weights]
            values = torch.cat([v for v, _ in parts]) if len(parts) > 1 else parts[0][0]
            scale = torch.cat([s for _, s in parts]) if len(parts) > 1 else parts[0][1]
        else:  # one float matrix (the output layer: no float copy of it is made)
            weight = torch.cat(list(weights)) if len(weights) > 1 else weights[0]
            values, scale = quantize_rows(weight)
        rows = values.size(0)
        bias = torch.cat([b.detach().float() if b is not None
                          else torch.zeros(w.size(0) if not isinstance(w, tuple) else
                                           w[0].size(0))
                          for w, b in zip(weights, biases)])
        if packing is None:
            with PackingPool() as pool:
                self._packing = _pack_parts(values, scale, bias, pool)
        else:  # an engine's pool, packing while the next layers are made
            self._packing = _pack_parts(values, scale, bias, packing)
        self._packed = None
        self.gelu, self.activation = gelu, activation
        self.extra_bytes = values.numel() + 8 * rows + 4 * bias.numel()

    @property
    def packed(self) -> list:
        """The packed matrices (waited for the first time)."""
        if self._packed is None:
            self._packed = [job.result() for job in self._packing]
            self._packing = None
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        parts = [torch.ops.quantized.linear_dynamic(rows, packed, True)
                 for packed in self.packed]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        y = y.view(*shape[:-1], y.size(-1))
        if self.gelu:
            return torch.nn.functional.gelu(y, approximate="tanh")
        return self.activation(y) if self.activation is not None else y


class Int8Layers:
    """Marks a model for int8 decoding: utils/decoding/engine.py builds its linear
    layers as Int8Linear (see `quantize_for_decoding`)."""
    linear = Int8Linear


class PrequantizedInt8Layers:
    """Int8Layers for a model whose linear weights were quantized as they
    loaded and never kept in float32 (they stay on the meta device): the
    engine's layers take their int8 rows from `quantized` (parameter id ->
    quantize_rows' pair), each handed over once."""

    def __init__(self, quantized: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
        self.quantized = quantized

    def linear(self, weights, biases, **kwargs) -> Int8Linear:
        return Int8Linear([self._take(w) for w in weights], biases, **kwargs)

    def _take(self, weight: torch.Tensor):
        if weight.device.type != "meta":
            return weight
        try:  # once packed, the pair is not kept twice
            return self.quantized.pop(id(weight))
        except KeyError:
            raise UserError("this model's int8 weights were packed when it loaded and "
                            "its float32 weights were never kept: load it again to "
                            "rebuild its engine") from None


def quantize_for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """Mark `model` (a float32 GPT2Decoder on the CPU) for int8 decoding:
    the engine built for it from now on (utils/decoding/engine.py) quantizes
    its linear layers into 8-bit copies. Returns the model. A model already
    quantized as it loaded keeps its marks."""
    if isinstance(decoding_layers(model), PrequantizedInt8Layers):
        return model
    require_int8(next(model.parameters()).device)
    if next(model.parameters()).dtype != torch.float32:
        raise UserError("int8 decoding starts from float32 weights: load the "
                        "model in float32 before quantizing")
    model._decoding_layers = Int8Layers
    return model


def decoding_layers(model: torch.nn.Module):
    return getattr(model, "_decoding_layers", None)
