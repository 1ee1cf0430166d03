"""Build texar's GPT2Decoder from GPT-2's five size numbers.

OpenAI describes each GPT-2 model with five numbers (its `hparams.json`):
n_vocab, n_ctx, n_embd, n_head, n_layer. texar-pytorch wants a nested hparams
dict. `gpt2_hparams` makes the second from the first, `model_size` goes back,
and `build_model` constructs the decoder. Sizes read from a file (hparams.json,
a checkpoint) pass `check_sizes` first and are turned into hparams here: texar
builds whatever class an hparams "type" names, so it never sees a dict read
from a data file.

texar's TransformerDecoder always creates an encoder-decoder attention block
per layer, which GPT-2 never uses (there is no encoder memory). `build_model`
drops those modules so the model holds exactly OpenAI's parameters: 124,439,808
for the 117M/124M model instead of 152,770,560. They are never called when no
`memory` is passed, and removing them saves the memory and optimizer state.

Memory mode (`build_model(hparams, with_memory=True)`, or `memory = True` in a
model config) keeps them, so that `model(memory=..., memory_sequence_length=...)`
attends to a source's hidden states (summarization, dialogue: the original's
"Other Use Cases" Ex. 3). OpenAI's checkpoints have no such weights: they
start as texar initialises them (the config's variance-scaling initializer,
layer norms at 1 and 0) and are trained from there; our checkpoints save them,
with `with_memory` recorded as a plain bool. A model without them refuses a
`memory` with one UserError instead of texar's IndexError.
"""
import copy
import sys
import types
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from utils.config_modules import check_config_names, load_config_module
from utils.errors import UserError
from utils.fused_attention import set_attention
from utils.fused_gelu import set_gelu

SIZE_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
# What a model config module may set: `hparams`, `memory` and the five sizes
# hparams is built from (configs/config_model_117M.py).
MODEL_CONFIG_FIELDS = ("hparams", "memory") + SIZE_KEYS
# Upper bounds on the five sizes. Far above any released GPT-2 (the 1558M
# model: n_vocab 50257, n_ctx 1024, n_embd 1600, n_head 25, n_layer 48), yet
# they keep a typo or a hostile file ("n_layer": 200000000) from reaching the
# memory estimate, let alone texar. Memory is checked separately.
SIZE_LIMITS = {"n_vocab": 10_000_000, "n_ctx": 1_048_576, "n_embd": 65_536,
               "n_head": 65_536, "n_layer": 1_000}
# Where texar's GPT2Decoder hparams (as gpt2_hparams writes them) keep each size.
_TEXAR_SIZE_PATHS = {"n_vocab": ("vocab_size",), "n_ctx": ("position_size",),
                     "n_embd": ("decoder", "dim"),
                     "n_head": ("decoder", "multihead_attention", "num_heads"),
                     "n_layer": ("decoder", "num_blocks")}
# ... and each dropout rate.
_TEXAR_DROPOUT_PATHS = {
    "embedding_dropout": ("decoder", "embedding_dropout"),
    "residual_dropout": ("decoder", "residual_dropout"),
    "attention_dropout": ("decoder", "multihead_attention", "dropout_rate")}


def _short_repr(value: Any, limit: int = 40) -> str:
    """repr(value), cut so that a hostile file cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_sizes(sizes: Any, source: str, exact: bool = False) -> Dict[str, int]:
    """GPT-2's five sizes as plain ints, or a one-line UserError naming `source`.

    Each must be a Python int (not bool, not float: JSON's 32.0 and 1e400 are
    refused) between 1 and its SIZE_LIMITS bound, and n_embd must divide by
    n_head. `exact` also refuses keys other than the five.
    """
    if not isinstance(sizes, Mapping):
        raise UserError(f"{source}: the model sizes must be a mapping of "
                        f"{', '.join(SIZE_KEYS)}, not {type(sizes).__name__}")
    missing = [k for k in SIZE_KEYS if k not in sizes]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: it must hold "
                        f"{', '.join(SIZE_KEYS)}")
    extra = sorted(_short_repr(k) for k in sizes if k not in SIZE_KEYS)
    if exact and extra:
        raise UserError(f"{source}: unexpected entries {', '.join(extra[:5])} among "
                        f"the model sizes (only {', '.join(SIZE_KEYS)} belong there)")
    checked = {}
    for key in SIZE_KEYS:
        value = sizes[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{source}: {key}={_short_repr(value)} is not a whole "
                            f"number: GPT-2 sizes are positive integers")
        if not 1 <= value <= SIZE_LIMITS[key]:
            raise UserError(f"{source}: {key}={_short_repr(value)} is out of range: "
                            f"it must be between 1 and {SIZE_LIMITS[key]:,}")
        checked[key] = value
    if checked["n_embd"] % checked["n_head"]:
        raise UserError(f"{source}: n_embd ({checked['n_embd']}) must be divisible "
                        f"by n_head ({checked['n_head']})")
    return checked


def parameter_count(sizes: Mapping[str, int]) -> int:
    """How many parameters GPT-2 of these (checked) sizes has; no allocation.

    Embeddings V*E + C*E, per layer 12*E^2 + 13*E (q, k, v, o projections,
    the 4x feed-forward, two layer norms), and the final layer norm 2*E. The
    output layer shares the token embedding.
    """
    v, c, e, layers = sizes["n_vocab"], sizes["n_ctx"], sizes["n_embd"], sizes["n_layer"]
    return v * e + c * e + layers * (12 * e * e + 13 * e) + 2 * e


def build_peak_bytes(sizes: Mapping[str, int]) -> int:
    """fp32 bytes build_model holds at its peak for a model of these sizes.

    texar also builds, per layer, a cross-attention block (4 projections and
    a layer norm: 4*E^2 + 6*E) and a separate V x E output layer before the
    embedding replaces it; build_model drops both, but they exist at once.
    """
    v, e, layers = sizes["n_vocab"], sizes["n_embd"], sizes["n_layer"]
    transient = layers * (4 * e * e + 6 * e) + v * e
    return 4 * (parameter_count(sizes) + transient)


def gpt2_hparams(n_vocab: int, n_ctx: int, n_embd: int, n_head: int,
                 n_layer: int, dropout: float = 0.0) -> Dict[str, Any]:
    """texar GPT2Decoder hparams for a GPT-2 of the given size.

    The feed-forward block is Linear(4*n_embd) -> GPT GELU -> Linear, as in
    GPT-2. `dropout` applies to embeddings, residuals and attention weights;
    the released GPT-2 models were evaluated without it.
    """
    check_sizes(dict(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head,
                     n_layer=n_layer), "GPT-2 sizes")
    if (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0):
        raise UserError(f"dropout={_short_repr(dropout)} must be a number in [0, 1)")
    return {
        "name": "gpt2_decoder",
        "pretrained_model_name": None,  # we load weights ourselves
        "vocab_size": n_vocab,
        "context_size": n_ctx,
        "embedding_size": n_embd,
        "embed": {"dim": n_embd, "name": "word_embeddings"},
        "position_size": n_ctx,
        "position_embed": {"dim": n_embd, "name": "position_embeddings"},
        "decoder": {
            "dim": n_embd,
            "num_blocks": n_layer,
            "embedding_dropout": dropout,
            "residual_dropout": dropout,
            "multihead_attention": {
                "use_bias": True,
                "num_units": n_embd,
                "num_heads": n_head,
                "dropout_rate": dropout,
                "output_dim": n_embd,
            },
            "initializer": {
                "type": "variance_scaling_initializer",
                "kwargs": {"factor": 1.0, "mode": "FAN_AVG", "uniform": True},
            },
            "eps": 1e-5,
            "poswise_feedforward": {
                "layers": [
                    {"type": "Linear", "kwargs": {"in_features": n_embd,
                                                  "out_features": 4 * n_embd,
                                                  "bias": True}},
                    {"type": "GPTGELU", "kwargs": {}},
                    {"type": "Linear", "kwargs": {"in_features": 4 * n_embd,
                                                  "out_features": n_embd,
                                                  "bias": True}},
                ],
                "name": "ffn",
            },
        },
    }


def hparams_from_openai(openai_hparams: Any,
                        source: str = "hparams.json") -> Dict[str, Any]:
    """texar hparams from the dict in an OpenAI model directory's hparams.json.

    Only the five sizes are read (and checked); `source` names the file in errors.
    """
    sizes = check_sizes(openai_hparams, source)
    return gpt2_hparams(**sizes)


def _walk(hparams: Any, path: tuple, source: str) -> Any:
    """hparams[path[0]][path[1]]..., or a UserError naming the missing entry."""
    node = hparams
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise UserError(f"{source}: no {'.'.join(path[:depth + 1])} in the "
                            f"model hparams, so the model's size is unknown")
        node = node[key]
    return node


def model_size(hparams: Any, source: str = "the model hparams") -> Dict[str, int]:
    """The five OpenAI size numbers of a texar GPT2Decoder hparams dict, checked.

    Only the size entries are read: the rest of the dict (types, kwargs) is
    never looked at, so an untrusted dict can be measured safely.
    """
    raw = {key: _walk(hparams, path, source) for key, path in _TEXAR_SIZE_PATHS.items()}
    return check_sizes(raw, source)


def model_dropout(hparams: Any, source: str = "the model hparams") -> Dict[str, float]:
    """The three dropout rates of a texar GPT2Decoder hparams dict (0 when absent)."""
    rates = {}
    for key, path in _TEXAR_DROPOUT_PATHS.items():
        try:
            rates[key] = _walk(hparams, path, source)
        except UserError:
            rates[key] = 0.0
    return check_dropout(rates, source)


def check_dropout(rates: Any, source: str) -> Dict[str, float]:
    """Dropout rates as floats in [0, 1), keyed as _TEXAR_DROPOUT_PATHS; else UserError."""
    if not isinstance(rates, Mapping) or set(rates) != set(_TEXAR_DROPOUT_PATHS):
        raise UserError(f"{source}: the dropout rates must be a mapping of exactly "
                        f"{', '.join(_TEXAR_DROPOUT_PATHS)}")
    checked = {}
    for key in _TEXAR_DROPOUT_PATHS:
        value = rates[key]
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not 0.0 <= value < 1.0):  # NaN fails the comparison too
            raise UserError(f"{source}: {key}={_short_repr(value)} must be a number "
                            f"in [0, 1)")
        checked[key] = float(value)
    return checked


def hparams_from_sizes(sizes: Mapping[str, int],
                       dropout: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """gpt2_hparams for checked sizes, with per-part dropout rates if given."""
    hparams = gpt2_hparams(**sizes)
    for key, rate in (dropout or {}).items():
        *parents, leaf = _TEXAR_DROPOUT_PATHS[key]
        node = hparams
        for parent in parents:
            node = node[parent]
        node[leaf] = rate
    return hparams


def check_sizes_agree(config_hparams: Dict[str, Any],
                      openai_hparams: Mapping[str, Any], config_name: str,
                      hparams_path: str) -> None:
    """Raise a UserError naming both values when a config and the sizes a
    checkpoint or hparams.json gives (`openai_hparams`) differ."""
    ours = model_size(config_hparams, config_name)
    theirs = check_sizes(openai_hparams, hparams_path)
    diffs = [f"{k}={ours[k]} in {config_name} but {theirs[k]} in {hparams_path}"
             for k in SIZE_KEYS if ours[k] != theirs[k]]
    if diffs:
        raise UserError("the model config does not match the checkpoint: "
                        + "; ".join(diffs)
                        + " (pick the matching --config_model, or leave it out "
                          "to use hparams.json)")


def load_model_hparams(config_name: str) -> Dict[str, Any]:
    """The `hparams` dict of a model config module (name or .py path)."""
    module = load_config_module(config_name)
    check_config_names(module, MODEL_CONFIG_FIELDS, f"model config {config_name}",
                       "configs/config_model_117M.py")
    hparams = getattr(module, "hparams", None)
    if not isinstance(hparams, dict):
        raise UserError(f"model config {config_name} must define a dict named "
                        f"'hparams' (see configs/config_model_117M.py)")
    try:
        sizes = model_size(hparams, f"model config {config_name}")
    except UserError as err:
        raise UserError(f"{err} ('hparams' is not a complete GPT2Decoder hparams "
                        f"dict: build it with utils.model.gpt2_hparams as "
                        f"configs/config_model_117M.py does)") from None
    # The five numbers are there to build hparams from: one that hparams does
    # not carry would be ignored.
    stale = [f"{key} = {_short_repr(getattr(module, key))} but hparams has {sizes[key]}"
             for key in SIZE_KEYS if hasattr(module, key) and getattr(module, key) != sizes[key]]
    if stale:
        raise UserError(f"model config {config_name} sets {'; '.join(stale)}: build "
                        f"hparams from them (gpt2_hparams(n_vocab=n_vocab, ...) as "
                        f"configs/config_model_117M.py does)")
    return copy.deepcopy(hparams)


# The parameters of the cross-attention blocks that memory mode keeps.
MEMORY_PARAMETER_PREFIXES = ("decoder.enc_dec_attns.", "decoder.end_dec_attn_layer_norm.")


def is_memory_parameter(name: str) -> bool:
    return name.startswith(MEMORY_PARAMETER_PREFIXES)


def config_with_memory(config_name: str) -> bool:
    """A model config's `memory` setting: True keeps texar's cross-attention."""
    memory = getattr(load_config_module(config_name), "memory", False)
    if not isinstance(memory, bool):
        raise UserError(f"model config {config_name}: memory = {_short_repr(memory)} "
                        f"must be True or False")
    return memory


def import_texar():
    """`texar.torch`, imported without its import-time deprecation warnings.

    The one place the project imports texar (torch's and numpy's deprecations
    of the APIs texar 0.1.4 uses would otherwise print on every run).
    """
    with warnings.catch_warnings(), _stand_ins_while_texar_imports():
        warnings.simplefilter("ignore")
        import texar.torch as tx
    return tx


def _strtobool(value: str) -> int:
    """distutils.util.strtobool: 1 for y/yes/t/true/on/1, 0 for n/no/f/false/off/0."""
    lowered = value.lower()
    if lowered in ("y", "yes", "t", "true", "on", "1"):
        return 1
    if lowered in ("n", "no", "f", "false", "off", "0"):
        return 0
    raise ValueError(f"invalid truth value {lowered!r}")


@contextmanager
def _stand_ins_while_texar_imports():
    """texar 0.1.4 imports two modules at import time for one function each:
    pkg_resources for parse_version (the real module reads every installed
    distribution's metadata when imported) and distutils.util for strtobool
    (setuptools' distutils shim imports all of setuptools): together a
    noticeable part of a short run's start. While texar imports, stand-ins
    holding those functions take the names, unless the real modules are
    loaded already; afterwards the names are free again, so a later import
    gets the real module."""
    from packaging.version import parse  # texar-pytorch's own requirement
    functions = {"pkg_resources": ("parse_version", parse),
                 "distutils.util": ("strtobool", _strtobool)}
    stand_ins = {}
    for name, (function_name, function) in functions.items():
        if name not in sys.modules:
            stand_ins[name] = types.ModuleType(name)
            setattr(stand_ins[name], function_name, function)
            sys.modules[name] = stand_ins[name]
    try:
        yield
    finally:
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


def build_model(hparams: Dict[str, Any], with_memory: bool = False,
                initialize: bool = True, attention: str = "fused") -> nn.Module:
    """A randomly initialised texar GPT2Decoder holding only GPT-2's parameters,
    plus, `with_memory`, texar's cross-attention blocks (see the docstring).

    `attention`: "fused" runs training and evaluation forwards through
    PyTorch's scaled_dot_product_attention and one-kernel GELU, "texar" keeps
    texar's original attention and GELU (utils/fused_attention.py,
    utils/fused_gelu.py; same parameters, results within float rounding).

    `initialize=False` leaves the weights as allocated, unset, for a caller
    that fills every one of them (a strict load): texar's random start costs
    more than a second for GPT-2 124M and is thrown away by the load.
    """
    if not initialize:
        model = build_meta_model(hparams, with_memory, attention)
        place_parameters(model, lambda name, param: cpu_tensor_like(param))
        return model
    GPT2Decoder = import_texar().modules.GPT2Decoder
    hparams = copy.deepcopy(hparams)
    hparams["pretrained_model_name"] = None
    model = _drop_unused_blocks(GPT2Decoder(hparams=hparams), with_memory)
    return set_gelu(set_attention(model, attention), attention)


def build_meta_model(hparams: Dict[str, Any], with_memory: bool = False,
                     attention: str = "fused") -> nn.Module:
    """The GPT2Decoder of build_model with every parameter on the meta device:
    shapes only, nothing allocated, nothing drawn. `place_parameters` gives
    them storage (the weight loaders fill it tensor by tensor)."""
    GPT2Decoder = import_texar().modules.GPT2Decoder
    hparams = copy.deepcopy(hparams)
    hparams["pretrained_model_name"] = None
    with torch.device("meta"):
        model = GPT2Decoder(hparams=hparams)
    model = _drop_unused_blocks(model, with_memory)
    return set_gelu(set_attention(model, attention), attention)


def _drop_unused_blocks(model: nn.Module, with_memory: bool) -> nn.Module:
    if not with_memory:
        # GPT-2 has no encoder: drop the cross-attention texar builds regardless.
        model.decoder.enc_dec_attns = nn.ModuleList()
        model.decoder.end_dec_attn_layer_norm = nn.ModuleList()
        model.register_forward_pre_hook(_refuse_memory, with_kwargs=True)
    return model


def cpu_tensor_like(param: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of `param`'s shape and dtype.
    Not torch.empty_like: on a meta tensor that goes through torch._refs,
    whose first call imports sympy, a noticeable part of a short run's start."""
    return torch.empty(param.shape, dtype=param.dtype)


def place_parameters(model: nn.Module,
                     storage_for: Callable[[str, nn.Parameter], Optional[torch.Tensor]]
                     ) -> None:
    """Give `model`'s meta parameters storage: each becomes a Parameter over
    `storage_for(name, param)` (a tensor of its shape and dtype, contents not
    set), or stays on meta where that is None. A parameter shared by two
    modules (the output layer tied to the token embedding) stays shared."""
    placed: Dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for key, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in placed:
                name = f"{prefix}.{key}" if prefix else key
                storage = storage_for(name, param)
                if storage is None:
                    continue
                if tuple(storage.shape) != tuple(param.shape) or storage.dtype != param.dtype:
                    raise ValueError(f"storage for {name} is {storage.dtype} "
                                     f"{list(storage.shape)}, not {param.dtype} "
                                     f"{list(param.shape)}")
                placed[id(param)] = nn.Parameter(storage, requires_grad=param.requires_grad)
            module._parameters[key] = placed[id(param)]


def has_memory(model: nn.Module) -> bool:
    """Whether `model` (built by build_model) keeps the cross-attention blocks."""
    return len(model.decoder.enc_dec_attns) > 0


def _refuse_memory(model: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook of a model without cross-attention: texar would index
    the missing blocks and fail with an IndexError."""
    if kwargs.get("memory") is not None or len(args) > 2 and args[2] is not None:
        raise UserError("this model has no cross-attention, so it cannot attend to a "
                        "memory: build it with build_model(hparams, with_memory=True) "
                        "or a model config that sets memory = True")


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (the output layer shares the embedding)."""
    return sum(p.numel() for p in model.parameters())
