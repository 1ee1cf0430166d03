"""The decoding engine: the forward pass of a texar GPT2Decoder for
utils/decoding/generation.py, with a preallocated KV cache and each linear
layer prepared once for its kernel.

The engine reads the model's own parameters (layer norms, embeddings, and
every weight a kernel can use as it is). What it prepares, once per model
and parameter state (`engine_for` caches it and rebuilds it when a
parameter is replaced or changed in place; it never changes the model):
- Q, K and V fused into one [3D, D] matrix: one product instead of three
  (a view of a packed model's weights, see below; otherwise a copy: 3 * D * D
  floats per layer, 21M floats or 81 MiB for GPT-2 124M);
- with `--dtype int8`, 8-bit packed copies of every linear layer
  (utils/decoding/int8_linear.py), the output layer included.

`prepare_for_decoding`, called once where a model is loaded for decoding
(gpt2_generate_main.py), is the step that does change the model: a frozen
float model on the CPU has its parameters moved into one huge-page block in
the order a step reads them (utils/decoding/weight_arena.py): the stream of
weights is faster to read, and Q, K and V lie back to back, so their fused
matrix is a view instead of a copy. With `--dtype int8` it marks the model
for 8-bit layers instead; either way the engine is built there, at load
time, rather than on the first prompt. A model streamed from its files
through utils/decoding/load_targets.py is already laid out (or quantized)
as it loaded: nothing is copied here.
"""
import functools
import weakref
from typing import Generator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.decoding import compiled_step

from utils.decoding import linear as cpu_linear

from utils.decoding import int8_linear

from utils.decoding import weight_arena

_ENGINES = weakref.WeakKeyDictionary()  # model -> (parameter state, engine)


def engine_for(model: nn.Module) -> "GPT2Net":
    """The engine for `model`'s current parameters (built on first use)."""
    state = tuple((p.data_ptr(), p._version, p.dtype, p.device)
                  for p in model.parameters())
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == state:
        return cached[1]
    _ENGINES.pop(model, None)  # its prepared tensors go before new ones are made
    net = GPT2Net(model)
    net.step_kernels = compiled_step.kernels_serving(model, net)
    _ENGINES[model] = (state, net)
    return net


def prepare_for_decoding(model: nn.Module, int8: bool = False,
                         huge_pages: bool = True) -> "GPT2Net":
    """Get a loaded model ready to decode, and build its engine now: with
    `int8`, mark it for 8-bit linear layers (utils/decoding/int8_linear.py);
    otherwise, with `huge_pages`, pack a frozen CPU model into huge pages
    (`pack_for_decoding`; worth it for long sessions only, see
    utils/decoding/weight_arena.py)."""
    if int8:
        int8_linear.quantize_for_decoding(model)
    elif huge_pages:
        pack_for_decoding(model)
    return engine_for(model)


class _Layer:
    """One transformer block: layer norms (the model's tensors) and prepared
    linear layers."""

    def __init__(self, decoder: nn.Module, i: int, make_linear):
        attn = decoder.self_attns[i]
        ln1, ln2 = decoder.self_attn_layer_norm[i], decoder.poswise_layer_norm[i]
        fc1, act, fc2 = decoder.poswise_networks[i]._layers
        self.ln1 = (ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        self.ln2 = (ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        dense = (attn.Q_dense, attn.K_dense, attn.V_dense)
        self.qkv = make_linear([d.weight for d in dense], [d.bias for d in dense])
        self.o = make_linear([attn.O_dense.weight], [attn.O_dense.bias])
        # GPT-2's tanh GELU is fused into the first feed-forward layer; any
        # other activation is called as the model's own module.
        if type(act).__name__ == "GPTGELU":
            self.fc1 = make_linear([fc1.weight], [fc1.bias], gelu=True)
        else:
            self.fc1 = make_linear([fc1.weight], [fc1.bias], activation=act)
        self.fc2 = make_linear([fc2.weight], [fc2.bias])

    def linears(self):
        return (self.qkv, self.o, self.fc1, self.fc2)


def decoding_order(model: nn.Module) -> List[List[nn.Parameter]]:
    """The model's parameters in the order a decoding step reads them, in
    groups to be placed back to back (Q, K and V weights; their biases);
    parameters decoding does not read (memory mode's) come last."""
    dec = model.decoder
    groups = [[model.position_embedder.embedding]]
    for i, attn in enumerate(dec.self_attns):
        ln1, ln2 = dec.self_attn_layer_norm[i], dec.poswise_layer_norm[i]
        fc1, _, fc2 = dec.poswise_networks[i]._layers
        dense = (attn.Q_dense, attn.K_dense, attn.V_dense)
        groups += [[ln1.weight, ln1.bias], [d.weight for d in dense],
                   [d.bias for d in dense], [attn.O_dense.weight], [attn.O_dense.bias],
                   [ln2.weight, ln2.bias], [fc1.weight], [fc1.bias],
                   [fc2.weight], [fc2.bias]]
    final = dec.final_layer_norm
    groups += [[final.weight, final.bias], [model.word_embedder.embedding]]
    listed = {id(p) for g in groups for p in g}
    groups += [[p] for p in model.parameters() if id(p) not in listed]
    return [g for g in groups if all(p is not None for p in g)]


def pack_for_decoding(model: nn.Module) -> bool:
    """Move a frozen CPU model's parameters into one huge-page block in
    decoding order (utils/decoding/weight_arena.py); whether they are there now."""
    params = list(model.parameters())
    if any(p.requires_grad or p.device.type != "cpu" for p in params):
        return False
    return weight_arena.pack_parameters(decoding_order(model)) is not None


class GPT2Net:
    """The forward pass of a texar GPT2Decoder, with a preallocated KV cache."""

    def __init__(self, model: nn.Module):
        dec = model.decoder
        self.wte = model.word_embedder.embedding
        self.wpe = model.position_embedder.embedding
        self.device, self.dtype = self.wte.device, self.wte.dtype
        layers = int8_linear.decoding_layers(model)
        if layers is None:
            self._build_linears(dec, cpu_linear.PreparedLinear)
        else:  # int8: packed on worker threads while the layers are made
            with int8_linear.PackingPool() as pool:
                self._build_linears(dec, functools.partial(layers.linear, packing=pool))
        self.final_ln = (dec.final_layer_norm.normalized_shape,
                         dec.final_layer_norm.weight, dec.final_layer_norm.bias,
                         dec.final_layer_norm.eps)
        self.n_head = int(dec.self_attns[0]._hparams.num_heads)
        self.n_vocab, self.n_embd = self.wte.shape
        self.n_ctx = self.wpe.shape[0]
        self.head_dim = self.n_embd // self.n_head
        # Batch-1 steps through utils/decoding/compiled_step.py's kernels, when set.
        self.step_kernels = None

    def _build_linears(self, dec: nn.Module, make_linear) -> None:
        out = dec._output_layer  # nn.Linear tied to the word embedding
        self.out = make_linear([out.weight], [out.bias])
        self.layers = [_Layer(dec, i, make_linear) for i in range(len(dec.self_attns))]

    @property
    def compiled(self) -> bool:
        return self.step_kernels is not None

    def extra_bytes(self) -> int:
        """Memory the prepared copies take beside the model's parameters."""
        return self.out.extra_bytes + sum(lin.extra_bytes for layer in self.layers
                                          for lin in layer.linears())

    def new_cache(self, rows: int, slots: int) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = (len(self.layers), rows, self.n_head, slots, self.head_dim)
        if self.device.type == "cpu":  # read whole at every step, like the weights
            return (weight_arena.empty(shape, self.dtype),
                    weight_arena.empty(shape, self.dtype))
        return (torch.empty(shape, device=self.device, dtype=self.dtype),
                torch.empty(shape, device=self.device, dtype=self.dtype))

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor,
               cache: Optional[Tuple[torch.Tensor, torch.Tensor]], start: int,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Final hidden states [B, T, D] of tokens `ids` [B, T] at cache slots
        start..start+T-1 (written into `cache` when given).

        `mask` (bool, True = may attend) is [B, 1, T, start+T] or None for
        plain causal attention over every slot.
        """
        return run_through(self.hidden_by_layer(ids, positions, cache, start, mask))

    def hidden_by_layer(self, ids: torch.Tensor, positions: torch.Tensor,
                        cache: Optional[Tuple[torch.Tensor, torch.Tensor]], start: int,
                        mask: Optional[torch.Tensor]) -> Generator[None, None, torch.Tensor]:
        """`hidden` as a generator that yields after each layer but the last,
        so that its caller can run other work in between (the server
        prefills a new request there, in other cache rows); it returns the
        final hidden states."""
        B, T = ids.shape
        H, hd, D = self.n_head, self.head_dim, self.n_embd
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        end = start + T
        causal = mask is None and T > 1
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(x, *layer.ln1)
            # [B, T, 3, H, hd] -> three [B, H, T, hd] views of one product
            q, k, v = layer.qkv(h).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                cache[0][i, :, :, start:end] = k
                cache[1][i, :, :, start:end] = v
            if start:  # attend over the cached slots too
                k, v = cache[0][i, :, :, :end], cache[1][i, :, :, :end]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            x = x + layer.o(a.transpose(1, 2).reshape(B, T, D))
            x = x + layer.fc2(layer.fc1(F.layer_norm(x, *layer.ln2)))
            if i + 1 < len(self.layers):
                yield
        return F.layer_norm(x, *self.final_ln)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden)

    def next_logits(self, ids: torch.Tensor, positions: torch.Tensor,
                    cache: Optional[Tuple[torch.Tensor, torch.Tensor]], start: int,
                    mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits [B, V] after the last of tokens `ids` [B, T] (arguments as
        for hidden). A batch-1 step of one token runs compiled when enabled
        (utils/decoding/compiled_step.py)."""
        return run_through(self.next_logits_by_layer(ids, positions, cache, start, mask))

    def next_logits_by_layer(self, ids: torch.Tensor, positions: torch.Tensor,
                             cache: Optional[Tuple[torch.Tensor, torch.Tensor]],
                             start: int, mask: Optional[torch.Tensor]
                             ) -> Generator[None, None, torch.Tensor]:
        """`next_logits` as a generator, as hidden_by_layer (a compiled step
        runs whole, without yielding)."""
        B, T = ids.shape
        if (self.step_kernels is not None and B == 1 and T == 1 and cache is not None
                and mask is None):
            return compiled_step.next_logits(self, self.step_kernels, ids, positions,
                                             cache, start)
        hidden = yield from self.hidden_by_layer(ids, positions, cache, start, mask)
        return self.logits(hidden[:, -1])


def run_through(steps: Generator[None, None, torch.Tensor]) -> torch.Tensor:
    """The return value of a generator of the engine's `*_by_layer` methods,
    run without pausing."""
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value
