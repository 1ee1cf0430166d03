"""GPT-2 weights between texar's GPT2Decoder and Hugging Face transformers' names.

Pure renaming and reshaping of state dicts; transformers is never imported.
The Hugging Face side is GPT2LMHeadModel's state dict:

- `transformer.wte.weight`, `transformer.wpe.weight`: the embeddings, as in texar;
- per layer i, under `transformer.h.{i}.`: `ln_1`, `attn.c_attn`, `attn.c_proj`,
  `ln_2`, `mlp.c_fc`, `mlp.c_proj` (each `.weight` and `.bias`). The
  projections are transformers' Conv1D, whose weight is [in, out]: the
  transpose of torch's Linear that texar uses. `c_attn` fuses texar's
  Q, K and V projections, concatenated q|k|v along its out axis;
- `transformer.ln_f`, and `lm_head.weight`, tied to `transformer.wte.weight`
  (texar ties `decoder._output_layer.weight` to its word embedding likewise).
"""
import functools
from typing import Dict, Iterator, List, Mapping, Tuple

import torch

from utils.errors import UserError

StateDict = Dict[str, torch.Tensor]

# Tensors outside the layers: (Hugging Face name, texar name).
_OUTSIDE_LAYERS = [
    ("transformer.wte.weight", "word_embedder._embedding"),
    ("transformer.wpe.weight", "position_embedder._embedding"),
    ("transformer.ln_f.weight", "decoder.final_layer_norm.weight"),
    ("transformer.ln_f.bias", "decoder.final_layer_norm.bias"),
]
# The tied output projections, each the word embedding again.
_HF_HEAD, _TEXAR_HEAD = "lm_head.weight", "decoder._output_layer.weight"
# Attention masks older transformers releases saved with the weights.
_HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _layer_modules(i: int) -> List[Tuple[str, str, bool]]:
    """(Hugging Face module, texar module, is a Conv1D) of layer i, but c_attn."""
    hf, tx = f"transformer.h.{i}.", "decoder."
    ffn = f"{tx}poswise_networks.{i}._layers."
    return [
        (hf + "ln_1", f"{tx}self_attn_layer_norm.{i}", False),
        (hf + "attn.c_proj", f"{tx}self_attns.{i}.O_dense", True),
        (hf + "ln_2", f"{tx}poswise_layer_norm.{i}", False),
        (hf + "mlp.c_fc", ffn + "0", True),
        (hf + "mlp.c_proj", ffn + "2", True),
    ]


def _one_to_one(n_layer: int) -> List[Tuple[str, str, bool]]:
    """(Hugging Face name, texar name, transposed) of every tensor copied whole."""
    pairs = [(hf, tx, False) for hf, tx in _OUTSIDE_LAYERS]
    for i in range(n_layer):
        for hf, tx, is_conv in _layer_modules(i):
            pairs += [(hf + ".weight", tx + ".weight", is_conv),
                      (hf + ".bias", tx + ".bias", False)]
    return pairs


def _fused_qkv(i: int) -> Tuple[str, List[str]]:
    """Layer i's Hugging Face c_attn module and the texar Q, K, V modules it fuses."""
    return (f"transformer.h.{i}.attn.c_attn",
            [f"decoder.self_attns.{i}.{part}_dense" for part in "QKV"])


def _getter(state: StateDict, what: str, n_layer: int):
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise UserError(f"the {what} weights have no tensor {name}: they are not a "
                            f"GPT-2 of {n_layer} layers")
        return state[name]
    return get


def _copied_whole(get, n_layer: int, to_hf: bool) -> StateDict:
    """The tensors of `_one_to_one`, under the other side's names."""
    out = {}
    for hf, tx, transposed in _one_to_one(n_layer):
        source, target = (tx, hf) if to_hf else (hf, tx)
        out[target] = get(source).t().contiguous() if transposed else get(source)
    return out


def texar_to_hf_tensors(texar_state: StateDict, n_layer: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every GPT2LMHeadModel weight but the tied
    `lm_head.weight`, made one at a time from a texar GPT2Decoder's state dict:
    a writer that streams them holds one converted tensor at a time."""
    get = _getter(texar_state, "texar GPT2Decoder", n_layer)
    for hf, tx, transposed in _one_to_one(n_layer):
        yield hf, get(tx).t().contiguous() if transposed else get(tx)
    for i in range(n_layer):
        fused, parts = _fused_qkv(i)
        weights = [get(p + ".weight") for p in parts]
        yield fused + ".weight", torch.cat(weights).t().contiguous()  # [in, q|k|v]
        yield fused + ".bias", torch.cat([get(p + ".bias") for p in parts])


def texar_to_hf_state_dict(texar_state: StateDict, n_layer: int) -> StateDict:
    """Hugging Face GPT2LMHeadModel tensor name -> tensor, from a texar GPT2Decoder's.

    Tensors copied as they are may share memory with `texar_state`.
    """
    hf_state = dict(texar_to_hf_tensors(texar_state, n_layer))
    hf_state[_HF_HEAD] = hf_state["transformer.wte.weight"]
    return hf_state


def hf_to_texar_state_dict(hf_state: StateDict, n_layer: int) -> StateDict:
    """texar GPT2Decoder tensor name -> tensor, from a Hugging Face GPT2LMHeadModel's.

    The inverse of `texar_to_hf_state_dict`. `lm_head.weight` is not read:
    texar's output layer is the word embedding. UserError when a tensor is
    missing, c_attn does not split in three, or tensors of other layers or
    modules are left over (a model of another depth or kind).
    """
    get = _getter(hf_state, "Hugging Face GPT-2", n_layer)
    texar_state = _copied_whole(get, n_layer, to_hf=False)
    for i in range(n_layer):
        fused, parts = _fused_qkv(i)
        weight, bias = get(fused + ".weight"), get(fused + ".bias")
        if weight.dim() != 2 or weight.shape[1] % 3 or bias.shape != weight.shape[1:]:
            raise UserError(f"{fused}.weight has shape {list(weight.shape)} and its bias "
                            f"{list(bias.shape)}: not a fused q|k|v projection of GPT-2")
        for part, w, b in zip(parts, weight.t().chunk(3), bias.chunk(3)):
            texar_state[part + ".weight"] = w.contiguous()
            texar_state[part + ".bias"] = b
    texar_state[_TEXAR_HEAD] = texar_state["word_embedder._embedding"]
    _check_nothing_left_over(hf_state, n_layer)
    return texar_state


@functools.lru_cache(maxsize=8)
def _texar_of_hf_names(n_layer: int) -> Dict[str, Tuple[Tuple[str, ...], bool]]:
    """Hugging Face name -> (texar names it fills, transposed) for every weight."""
    table = {hf: ((tx,), transposed) for hf, tx, transposed in _one_to_one(n_layer)}
    for i in range(n_layer):
        fused, parts = _fused_qkv(i)
        table[fused + ".weight"] = tuple(p + ".weight" for p in parts), True
        table[fused + ".bias"] = tuple(p + ".bias" for p in parts), False
    return table


def texar_of_hf_tensor(hf_name: str, tensor: torch.Tensor, n_layer: int
                       ) -> List[Tuple[str, torch.Tensor]]:
    """The texar (name, tensor) pairs one Hugging Face weight of a checked
    shape becomes (c_attn: three), so that a state dict can be built from a
    stream holding one copy; [] for the tied lm_head and old mask buffers."""
    if hf_name == _HF_HEAD or hf_name.endswith(_HF_MASK_BUFFERS):
        return []
    entry = _texar_of_hf_names(n_layer).get(hf_name)
    if entry is None:
        raise UserError(f"{hf_name} is not a weight of a GPT-2 of {n_layer} layers")
    names, transposed = entry
    value = tensor.t() if transposed else tensor
    pieces = value.chunk(3) if len(names) == 3 else [value]
    return [(name, piece.contiguous()) for name, piece in zip(names, pieces)]


def _check_nothing_left_over(hf_state: StateDict, n_layer: int) -> None:
    used = {hf for hf, _, _ in _one_to_one(n_layer)} | {_HF_HEAD}
    used |= {_fused_qkv(i)[0] + end for i in range(n_layer) for end in (".weight", ".bias")}
    left = sorted(name for name in hf_state
                  if name not in used and not name.endswith(_HF_MASK_BUFFERS))
    if left:
        raise UserError(f"the Hugging Face GPT-2 weights hold tensors a GPT-2 of {n_layer} "
                        f"layers does not have ({', '.join(left[:3])}"
                        f"{', ...' if len(left) > 3 else ''}): check the model's n_layer")


def hf_gpt2_config(sizes: Dict[str, int]) -> Dict[str, object]:
    """Keyword arguments of transformers' GPT2Config for a GPT-2 of `sizes`
    (utils.model.model_size's keys), dropout off, as texar's GPT-2 computes."""
    return dict(vocab_size=sizes["n_vocab"], n_positions=sizes["n_ctx"],
                n_embd=sizes["n_embd"], n_layer=sizes["n_layer"], n_head=sizes["n_head"],
                activation_function="gelu_new", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def hf_tensor_shapes(sizes: Mapping[str, int]) -> Dict[str, Tuple[int, ...]]:
    """Hugging Face name -> shape of every GPT2LMHeadModel weight of GPT-2 `sizes`,
    but the tied `lm_head.weight`, in name order."""
    v, c, e = sizes["n_vocab"], sizes["n_ctx"], sizes["n_embd"]
    shapes = {"transformer.wte.weight": (v, e), "transformer.wpe.weight": (c, e),
              "transformer.ln_f.weight": (e,), "transformer.ln_f.bias": (e,)}
    for i in range(sizes["n_layer"]):
        h = f"transformer.h.{i}."
        shapes.update({h + "ln_1.weight": (e,), h + "ln_1.bias": (e,),
                       h + "ln_2.weight": (e,), h + "ln_2.bias": (e,),
                       h + "attn.c_attn.weight": (e, 3 * e), h + "attn.c_attn.bias": (3 * e,),
                       h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
                       h + "mlp.c_fc.weight": (e, 4 * e), h + "mlp.c_fc.bias": (4 * e,),
                       h + "mlp.c_proj.weight": (4 * e, e), h + "mlp.c_proj.bias": (e,)})
    return dict(sorted(shapes.items()))


# OpenAI's TF names: model/wte, model/h3/attn/c_attn/w, model/h3/ln_1/g, ... Its
# Conv1D weights are [1, in, out]: Hugging Face's [in, out] with a leading 1.
_OPENAI_LEAF = {"w": "weight", "g": "weight", "b": "bias"}


def hf_name_of_openai(tf_name: str) -> str:
    """transformers' renaming (as load_tf_weights_in_gpt2): model/h3/ln_1/g ->
    transformer.h.3.ln_1.weight; model/wte -> transformer.wte.weight."""
    parts = tf_name.split("/")
    if parts[0] != "model" or len(parts) < 2:
        raise UserError(f"{tf_name!r} is not a GPT-2 variable name (model/...)")
    if parts[1] in ("wte", "wpe") and len(parts) == 2:
        return f"transformer.{parts[1]}.weight"
    if parts[1].startswith("h") and parts[1][1:].isdigit():
        parts[1:2] = ["h", str(int(parts[1][1:]))]
    return "transformer." + ".".join(parts[1:-1] + [_OPENAI_LEAF.get(parts[-1], parts[-1])])


def openai_of_hf(hf_name: str, tensor: torch.Tensor) -> Tuple[str, torch.Tensor]:
    """(OpenAI TF name, tensor in OpenAI's shape) of a Hugging Face GPT-2 weight."""
    if hf_name in ("transformer.wte.weight", "transformer.wpe.weight"):
        return "model/" + hf_name.split(".")[1], tensor
    parts = hf_name.split(".")
    if parts[0] != "transformer" or parts[-1] not in ("weight", "bias"):
        raise UserError(f"{hf_name!r} is not a GPT-2 weight name (transformer....)")
    scope = parts[1:-1]
    if scope[0] == "h":
        scope[0:2] = ["h" + scope[1]]
    is_norm = scope[-1].startswith("ln_")
    leaf = "b" if parts[-1] == "bias" else ("g" if is_norm else "w")
    if leaf == "w":
        tensor = tensor.unsqueeze(0)  # Conv1D [in, out] -> [1, in, out]
    return "model/" + "/".join(scope + [leaf]), tensor


def openai_of_hf_tensors(hf_tensors) -> Iterator[Tuple[str, torch.Tensor]]:
    """OpenAI (name, tensor) pairs of Hugging Face ones, lazily; the tied
    `lm_head.weight` is left out (OpenAI's checkpoints have no output layer)."""
    for name, tensor in hf_tensors:
        if name != _HF_HEAD:
            yield openai_of_hf(name, tensor)


def tie_output_layer(texar_state: StateDict) -> StateDict:
    """Add texar's output layer to a state dict: the word embedding, tied."""
    texar_state[_TEXAR_HEAD] = texar_state["word_embedder._embedding"]
    return texar_state
