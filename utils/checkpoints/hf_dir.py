"""Hugging Face GPT-2 model directories: read them into texar's GPT2Decoder, write them.

A directory `save_pretrained` writes holds `config.json`, the weights
(`model.safetensors`; or shards `model-0000K-of-0000N.safetensors` listed by
`model.safetensors.index.json`; or, from older releases, `pytorch_model.bin`
or its shards and `pytorch_model.bin.index.json`) and the tokenizer
(`vocab.json` + `merges.txt`: the same formats as OpenAI's `encoder.json` +
`vocab.bpe`, under other names).

- `detect_format(dir)`: "hf" or "openai", or a UserError saying what it holds;
- `read_hf_config(path)`: GPT-2's five sizes from config.json, refusing in one
  line, naming the field, anything texar's GPT2Decoder cannot compute;
- `read_hf_weights(dir, sizes)`: the texar state dict. `.bin` files are read
  with torch.load(weights_only=True), never unpickled freely;
- `hf_vocab_encoder(dir, n_vocab)`: the tokenizer to use, and where it is from;
- `write_hf_dir(dst, hf_tensors, sizes)`: a directory that transformers'
  `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
  load with no other file. `model.safetensors` is written here (the format is
  an 8-byte header size, a JSON header, the raw tensors): the safetensors
  package only writes from a complete dict, this writes tensor by tensor.

Every file is written atomically; config.json, which makes the directory a
Hugging Face one for `detect_format`, is written last.
"""
import json
import math
import os
import shutil
import struct
import zipfile
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.checkpoints.hf_names import hf_tensor_shapes, hf_to_texar_state_dict
from utils.checkpoints.openai_files import HPARAMS_FILE, INDEX_FILE
from utils.checkpoints.tf_reader import STATE_FILE
from utils.json_file import read_json
from utils.model import check_sizes
from utils.checkpoints.weight_checks import check_tensor
from utils.checkpoints.pages import release_pages
from utils.processor import (EOS_TOKEN, SHIPPED_VOCAB_FILES, Encoder, get_encoder,
                             vocab_files)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
HF_VOCAB, HF_MERGES = "vocab.json", "merges.txt"
# What write_hf_dir writes, in order (config.json last).
HF_DIR_FILES = (SAFETENSORS, HF_VOCAB, HF_MERGES, "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json", CONFIG)
_OPENAI_MARKERS = (STATE_FILE, INDEX_FILE, HPARAMS_FILE)
_WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
_UNSUPPORTED_WEIGHTS = ("tf_model.h5", "flax_model.msgpack", "rust_model.ot")

# GPT2Config's defaults: what transformers assumes for a field config.json leaves out.
_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
             "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
             "tie_word_embeddings": True, "add_cross_attention": False}
# All compute GPT-2's tanh approximation of GELU, as texar's GPTGELU does.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# ---------------------------------------------------------------------------
# Which format a directory holds

def detect_format(directory: str) -> str:
    """"hf" (config.json and weights) or "openai" (a TF checkpoint), else a
    UserError naming what the directory holds."""
    if not os.path.isdir(directory):
        raise UserError(f"model directory {directory} does not exist or is not a directory; "
                        "check the path")
    names = sorted(os.listdir(directory))
    hf = CONFIG in names
    openai = any(m in names for m in _OPENAI_MARKERS)
    if hf and openai:
        raise UserError(f"{directory} holds both a Hugging Face config.json and an OpenAI "
                        "TensorFlow checkpoint: keep one model per directory")
    if hf:
        if not any(w in names for w in _WEIGHT_FILES):
            others = [n for n in _UNSUPPORTED_WEIGHTS if n in names]
            has = f" (it has {', '.join(others)}, which this project cannot read)" \
                if others else ""
            raise UserError(f"{directory} has config.json but no {SAFETENSORS} or "
                            f"{TORCH_BIN}{has}: download the model's PyTorch weights too")
        return "hf"
    if openai:
        return "openai"
    listing = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") or "nothing"
    raise UserError(f"{directory} is neither an OpenAI GPT-2 model (checkpoint, "
                    f"model.ckpt.*) nor a Hugging Face one (config.json, {SAFETENSORS}): "
                    f"it holds {listing}")


# ---------------------------------------------------------------------------
# config.json

def _read_json(path: str, what: str):
    if not os.path.lexists(path):
        raise UserError(f"{what} {path} is missing")
    return read_json(path, what, "download it again")


def read_hf_config(path: str) -> Dict[str, int]:
    """GPT-2's five sizes (utils.model.SIZE_KEYS) from a config.json (or its
    directory). Fields left out take GPT2Config's defaults, as in transformers.
    The layer norm epsilon is always 1e-5, texar's GPT2Decoder's."""
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG)
    config = _read_json(path, "model config")
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(config).__name__}")
    if config.get("model_type") != "gpt2":
        raise UserError(f"{path}: model_type={config.get('model_type')!r}: only GPT-2 "
                        "models (model_type \"gpt2\") can be loaded")
    value = {**_DEFAULTS, **config}
    sizes = check_sizes({"n_vocab": value["vocab_size"], "n_ctx": value["n_positions"],
                         "n_embd": value["n_embd"], "n_head": value["n_head"],
                         "n_layer": value["n_layer"]}, path)
    for field, ok, why in _unrepresentable_checks(value, sizes):
        if not ok:
            raise UserError(f"{path}: {field}={value.get(field)!r} cannot be loaded into "
                            f"our GPT2Decoder, which {why}")
    return sizes


def _unrepresentable_checks(value: dict, sizes: Dict[str, int]):
    """(field, acceptable?, what our GPT2Decoder does instead) for config.json."""
    eps = value["layer_norm_epsilon"]
    architectures = value.get("architectures") or []
    return [
        ("architectures", isinstance(architectures, list) and
         all(a in _ARCHITECTURES for a in architectures),
         f"is a language model ({' or '.join(_ARCHITECTURES)}) with no other head"),
        ("n_ctx", value.get("n_ctx", sizes["n_ctx"]) == sizes["n_ctx"],
         f"has one context size (n_positions={sizes['n_ctx']})"),
        ("n_inner", value["n_inner"] in (None, 4 * sizes["n_embd"]),
         f"has a feed-forward layer of 4*n_embd={4 * sizes['n_embd']}"),
        ("activation_function", value["activation_function"] in _TANH_GELUS,
         f"uses GPT-2's tanh GELU ({', '.join(_TANH_GELUS)})"),
        ("layer_norm_epsilon", isinstance(eps, (int, float)) and not isinstance(eps, bool)
         and math.isclose(eps, 1e-5, rel_tol=1e-9), "uses 1e-5"),
        ("tie_word_embeddings", value["tie_word_embeddings"] is True,
         "ties its output layer to the token embedding"),
        ("scale_attn_weights", value["scale_attn_weights"] is True,
         "scales attention by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", value["scale_attn_by_inverse_layer_idx"] is False,
         "does not scale attention by layer"),
        ("reorder_and_upcast_attn", value["reorder_and_upcast_attn"] is False,
         "computes attention in the model's dtype"),
        ("add_cross_attention", value["add_cross_attention"] is False,
         "has no cross-attention"),
    ]


# ---------------------------------------------------------------------------
# Weights

def _safe_file_name(name, index_path: str, suffix: str) -> str:
    """A shard file name from an index: a plain file name in the same directory."""
    if not isinstance(name, str) or os.path.basename(name) != name or \
            name in ("", ".", "..") or not name.endswith(suffix):
        raise UserError(f"{index_path} names shard file {name!r}, which is not a "
                        f"{suffix} file beside it; download the model again")
    return name


def _shard_files(directory: str, index_name: str, suffix: str) -> List[str]:
    index_path = os.path.join(directory, index_name)
    index = _read_json(index_path, "weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index_path} has no weight_map; download the model again")
    return sorted({_safe_file_name(f, index_path, suffix) for f in weight_map.values()})


def _weight_files(directory: str) -> List[str]:
    """Paths of the weight files, in transformers' order of preference."""
    for single, index, suffix in ((SAFETENSORS, SAFETENSORS_INDEX, ".safetensors"),
                                  (TORCH_BIN, TORCH_BIN_INDEX, ".bin")):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(os.path.join(directory, index)):
            return [os.path.join(directory, n) for n in _shard_files(directory, index, suffix)]
    raise UserError(f"{directory} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}: "
                    "download the model's weights")


def _hf_name(name: str) -> str:
    """GPT2LMHeadModel's name of a tensor GPT2Model saved without `transformer.`."""
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def _check_shape(name: str, shape, expected: Dict[str, Tuple[int, ...]], path: str) -> None:
    want = expected.get(name)
    if want is not None and tuple(shape) != want:
        raise UserError(f"{path}: {name} has shape {list(shape)} but config.json's sizes "
                        f"need {list(want)}: the weights and config.json do not match")


def _safetensors_tensors(path: str, expected) -> Iterator[Tuple[str, torch.Tensor]]:
    """A safetensors file's tensors one at a time, all shapes checked first."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise UserError(f"weight file {path} is missing; download the model again")
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                _check_shape(_hf_name(key), f.get_slice(key).get_shape(), expected, path)
            for key in f.keys():
                tensor = f.get_tensor(key)
                yield _hf_name(key), tensor
                release_pages(tensor)  # when mapped from the file: its pages go back
    except SafetensorError as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); it may be "
                        "truncated: download it again") from None


def _torch_bin_tensors(path: str, expected) -> Iterator[Tuple[str, torch.Tensor]]:
    if not os.path.isfile(path):
        raise UserError(f"weight file {path} is missing; download the model again")
    try:
        state, mapped = _load_bin(path)
    except Exception as err:  # torch reports a bad archive in many types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{path} cannot be read as PyTorch weights with weights_only=True "
                        f"({type(err).__name__}: {first_line[:120]}); download it again or "
                        "use the model's model.safetensors") from None
    if not isinstance(state, dict) or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path} does not hold a state dict (tensor name -> tensor)")
    for key, tensor in state.items():
        _check_shape(_hf_name(key), tensor.shape, expected, path)
    while state:  # handed on one by one, so that a streaming caller frees each
        key, tensor = state.popitem()
        yield _hf_name(key), tensor
        if mapped:  # copied out by now: its file pages go back
            release_pages(tensor)


def _load_bin(path: str) -> Tuple[dict, bool]:
    """(torch.load of `path` with weights_only, whether its tensors are mapped
    from the file): mapped when it is in torch's zip format, so that its
    tensors are read one at a time as they are used; read whole otherwise
    (the legacy format cannot be mapped)."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    return torch.load(path, map_location="cpu", weights_only=True), False


def iter_hf_tensors(directory: str, sizes: Mapping[str, int]
                    ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(GPT2LMHeadModel name, tensor) of every tensor in the directory's weight
    files, as stored: one file at a time, each file's shapes checked against
    `sizes` (from `read_hf_config`) before its tensors are read. safetensors
    files are read one tensor at a time; a `.bin` file is loaded whole."""
    expected = hf_tensor_shapes(sizes)
    for path in _weight_files(directory):
        read = _safetensors_tensors if path.endswith(".safetensors") else _torch_bin_tensors
        for name, tensor in read(path, expected):
            check_tensor(name, tensor, path)
            yield name, tensor


def read_hf_weights(directory: str, sizes: Mapping[str, int]) -> Dict[str, torch.Tensor]:
    """texar GPT2Decoder state dict of the Hugging Face GPT-2 in `directory`
    (sizes from `read_hf_config`). Tensors keep their stored dtype; texar's
    `load_state_dict` casts them into the model's."""
    hf_state: Dict[str, torch.Tensor] = {}
    for name, tensor in iter_hf_tensors(directory, sizes):
        if name in hf_state:
            raise UserError(f"{directory}: tensor {name} is given twice; download the "
                            "model again")
        hf_state[name] = tensor
    return hf_to_texar_state_dict(hf_state, sizes["n_layer"])


# ---------------------------------------------------------------------------
# Vocabulary

def hf_vocab_encoder(directory: str, n_vocab: int) -> Tuple[Encoder, str]:
    """(tokenizer, where it is from) for a Hugging Face directory: its
    vocab.json + merges.txt when present (GPT-2's own, shipped, when they are
    equal to it), else the shipped GPT-2 vocabulary. Tokens added on top
    (added_tokens.json) are not used."""
    vocab, merges = (os.path.join(directory, n) for n in (HF_VOCAB, HF_MERGES))
    has_vocab, has_merges = os.path.isfile(vocab), os.path.isfile(merges)
    shipped = get_encoder()
    if not has_vocab and not has_merges:
        encoder, source = shipped, "GPT-2's vocabulary (utils/gpt2_vocab)"
    elif has_vocab != has_merges:
        present, missing = (vocab, HF_MERGES) if has_vocab else (merges, HF_VOCAB)
        raise UserError(f"{present} has no {missing} beside it; the tokenizer needs both: "
                        f"download {missing} with the model, or remove {present} to use "
                        "GPT-2's vocabulary")
    else:
        encoder = Encoder.from_files(vocab, merges)
        # Same tokens and merge ranks: GPT-2's vocabulary in Hugging Face's files.
        if encoder.encoder == shipped.encoder and encoder._pair_rank == shipped._pair_rank:
            encoder, source = shipped, f"GPT-2's vocabulary (as {HF_VOCAB}/{HF_MERGES})"
        else:
            source = f"the directory's own {HF_VOCAB}/{HF_MERGES}"
    if encoder.vocab_size > n_vocab:
        raise UserError(f"the tokenizer of {directory} has {encoder.vocab_size} tokens but "
                        f"the model only {n_vocab} (vocab_size in config.json)")
    return encoder, source


# ---------------------------------------------------------------------------
# Writing

def _safetensors_header(shapes: Mapping[str, Tuple[int, ...]], dtype: torch.dtype
                        ) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """(8-byte size + JSON header padded to 8 bytes, name -> (begin, end) in the data)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, spans, offset = {"__metadata__": {"format": "pt"}}, {}, 0
    for name in sorted(shapes):
        end = offset + itemsize * math.prod(shapes[name])
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, end]}
        spans[name], offset = (offset, end), end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, spans


def write_safetensors(path: str, tensors: Iterable[Tuple[str, torch.Tensor]],
                      shapes: Mapping[str, Tuple[int, ...]],
                      dtype: torch.dtype = torch.float32) -> None:
    """A safetensors file of exactly the tensors `shapes` names, each cast to
    `dtype`, taken one at a time from `tensors` in any order (each is written
    at its place, in name order). `lm_head.weight`, tied, is skipped."""
    header, spans = _safetensors_header(shapes, dtype)
    seen = set()
    with atomic_write(path) as f:
        f.write(header)
        for name, tensor in tensors:
            if name == "lm_head.weight":
                continue
            if name not in spans or name in seen:
                raise ValueError(f"tensor {name} is unexpected or given twice")
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"tensor {name} has shape {list(tensor.shape)}, "
                                 f"not {list(shapes[name])}")
            seen.add(name)
            data = tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8)
            f.seek(len(header) + spans[name][0])
            f.write(data.numpy().data)
        missing = sorted(set(spans) - seen)
        if missing:
            raise ValueError(f"tensors missing from the safetensors file: {missing[:3]}")


def _write_json(path: str, value) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as source, atomic_write(dst) as target:
        shutil.copyfileobj(source, target)


def hf_config_json(sizes: Mapping[str, int], eos_id: int,
                   dtype: torch.dtype = torch.float32) -> dict:
    """config.json of a GPT2LMHeadModel of `sizes`. The dropout rates are the
    released GPT-2's (0.1; they only matter when training)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": sizes["n_vocab"], "n_positions": sizes["n_ctx"],
            "n_ctx": sizes["n_ctx"], "n_embd": sizes["n_embd"], "n_head": sizes["n_head"],
            "n_layer": sizes["n_layer"], "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.1,
            "embd_pdrop": 0.1, "attn_pdrop": 0.1, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eos_id,
            "eos_token_id": eos_id, "torch_dtype": str(dtype).replace("torch.", "")}


def _tokenizer_files(sizes: Mapping[str, int]) -> Dict[str, dict]:
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    return {"tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer",
                                      "model_max_length": sizes["n_ctx"],
                                      "add_prefix_space": False, "add_bos_token": False,
                                      "errors": "replace", **special},
            "special_tokens_map.json": special}


def write_hf_dir(dst: str, hf_tensors: Iterable[Tuple[str, torch.Tensor]],
                 sizes: Mapping[str, int], vocab_dir: Optional[str] = None,
                 dtype: torch.dtype = torch.float32) -> List[str]:
    """Write a Hugging Face GPT-2 directory into `dst` (created if needed;
    refusing a non-empty one is the caller's business). `hf_tensors` yields
    GPT2LMHeadModel (name, tensor) pairs, e.g. hf_format.texar_to_hf_tensors;
    `vocab_dir` holds encoder.json + vocab.bpe, or vocab.json + merges.txt
    (default, or when it holds neither: GPT-2's, shipped).
    Returns the names of the files written, in the order written."""
    sizes = check_sizes(sizes, "the model sizes", exact=True)
    encoder_file, merges_file = (vocab_files(vocab_dir) if vocab_dir else None) \
        or SHIPPED_VOCAB_FILES
    encoder = get_encoder(os.path.dirname(encoder_file))
    if encoder.vocab_size > sizes["n_vocab"]:
        raise UserError(f"the vocabulary in {os.path.dirname(encoder_file)} has "
                        f"{encoder.vocab_size} tokens but the model only {sizes['n_vocab']}")
    os.makedirs(dst, exist_ok=True)
    write_safetensors(os.path.join(dst, SAFETENSORS), hf_tensors, hf_tensor_shapes(sizes),
                      dtype)
    _copy(encoder_file, os.path.join(dst, HF_VOCAB))
    _copy(merges_file, os.path.join(dst, HF_MERGES))
    jsons = {**_tokenizer_files(sizes),
             "generation_config.json": {"bos_token_id": encoder.eos_id,
                                        "eos_token_id": encoder.eos_id},
             CONFIG: hf_config_json(sizes, encoder.eos_id, dtype)}
    for name, value in jsons.items():  # config.json last
        _write_json(os.path.join(dst, name), value)
    written = [SAFETENSORS, HF_VOCAB, HF_MERGES, *jsons]
    assert written == list(HF_DIR_FILES)  # what convert_checkpoint.py claims it writes
    return written
