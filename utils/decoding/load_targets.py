"""Where a loaded model's weights land when it is loaded to decode on the CPU.

utils/checkpoints/streaming.py streams the weights one tensor at a time into
a model built on the meta device; these targets place them for the engine
(utils/decoding/engine.py) so that nothing is copied again after the load:
- `ArenaTarget` (float32): every parameter is a view of one huge-page block
  in the order a step reads them (utils/decoding/weight_arena.py), so the
  loader writes each weight straight into its final place and
  `pack_for_decoding` later finds the model already packed. Without huge
  pages (or for a short run, `huge_pages=False`), the same block in ordinary
  pages.
- `Int8Target` (`--dtype int8`): each linear layer's weight (Q, K, V, O and
  the feed-forward layers) is quantized to int8 rows as it arrives
  (utils/decoding/int8_linear.py) and never stored in float32: it stays on the
  meta device and the engine packs its int8 rows. The embeddings (the output
  layer's int8 copy is made from the token embedding in row blocks), layer
  norms and biases are float32 in huge pages. So the load never holds a
  float32 copy of the linear weights.
Use `target_for(int8, huge_pages)`.
"""
from typing import Dict, Optional, Set, Tuple

import torch
from torch import nn

from utils.checkpoints.streaming import LoadTarget
from utils.decoding import int8_linear, weight_arena
from utils.decoding.engine import decoding_order
from utils.model import place_parameters


class ArenaTarget(LoadTarget):
    """float32 weights straight into the block, in decoding order."""

    def __init__(self, huge_pages: bool = True):
        self.huge_pages = huge_pages

    def place(self, model: nn.Module) -> None:
        place_in_arena(model, skip=set(), huge_pages=self.huge_pages)


class Int8Target(LoadTarget):
    """Linear weights quantized as they arrive; the rest float32 in the block."""

    def __init__(self, huge_pages: bool = True):
        self.quantized: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.linear_weights: Set[int] = set()
        self.huge_pages = huge_pages
        self.scratch: Optional[torch.Tensor] = None  # one for the whole load

    def place(self, model: nn.Module) -> None:
        int8_linear.require_int8(torch.device("cpu"))
        self.linear_weights = {id(p) for p in quantized_weights(model)}
        place_in_arena(model, skip=self.linear_weights, huge_pages=self.huge_pages)
        model._decoding_layers = int8_linear.PrequantizedInt8Layers(self.quantized)
        self.scratch = int8_linear.quantization_scratch()

    def fills_rows(self, param: nn.Parameter) -> bool:
        return id(param) not in self.linear_weights

    def fill(self, name: str, param: nn.Parameter, value: torch.Tensor) -> None:
        if id(param) in self.linear_weights:
            self.quantized[id(param)] = int8_linear.quantize_rows(value, self.scratch)
        else:
            super().fill(name, param, value)

    def finish(self, model: nn.Module) -> None:
        self.scratch = None


def target_for(int8: bool, huge_pages: bool = True) -> LoadTarget:
    return Int8Target(huge_pages) if int8 else ArenaTarget(huge_pages)


def quantized_weights(model: nn.Module):
    """The linear layers' weights the int8 engine packs (the output layer,
    tied to the token embedding, is packed from the embedding)."""
    dec = model.decoder
    for attn, ffn in zip(dec.self_attns, dec.poswise_networks):
        yield from (attn.Q_dense.weight, attn.K_dense.weight, attn.V_dense.weight,
                    attn.O_dense.weight)
        fc1, _, fc2 = ffn._layers
        yield from (fc1.weight, fc2.weight)


def place_in_arena(model: nn.Module, skip: Set[int], huge_pages: bool = True) -> None:
    """Storage for the meta model's parameters but those in `skip` (ids,
    left on meta): one block in decoding order, in huge pages with
    `huge_pages` where the system has them. The tied output layer follows
    the embedding."""
    groups = [[p for p in g if id(p) not in skip] for g in decoding_order(model)]
    groups = [g for g in groups if g]
    views = weight_arena.allocate([[(p.shape, p.dtype) for p in g] for g in groups],
                                  huge_pages and weight_arena.huge_pages_available())
    storage = {id(p): v for g, g_views in zip(groups, views) for p, v in zip(g, g_views)}
    place_parameters(model, lambda name, param: storage.get(id(param)))
