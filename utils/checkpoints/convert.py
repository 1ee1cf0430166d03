"""convert_checkpoint.py's work: one GPT-2 from one format into another.

Sources, told apart by their files (`open_source`):
- "ckpt": a `.ckpt` file gpt2_train_main.py wrote (read with weights_only=True);
- "openai": OpenAI's model directory (hparams.json, model.ckpt.*);
- "hf": a Hugging Face GPT-2 directory (config.json, model.safetensors...), or
  `hf:NAME` fetched from the Hub (utils/checkpoints/hf_hub.py).
Every source is read as a stream of Hugging Face GPT2LMHeadModel (name,
tensor) pairs, each checked (`_checked`) against the model's sizes before a
writer sees it: names, shapes, nothing twice, nothing missing.

An adapter checkpoint (a LoRA run's, utils/lora.py) converts only with
`merge_lora`: its base model (the one it names, or `lora_base`) is loaded,
the adapters are merged into it, and the merged model is the source.

Destinations (`write_destination`):
- "hf": `utils.checkpoints.hf_dir.write_hf_dir`, model.safetensors written tensor by tensor;
- "openai": OpenAI's seven files, the checkpoint written tensor by tensor by
  `utils.checkpoints.tf_writer`;
- "ckpt": our own format, weights only (`--checkpoint` loads it).

Memory: an OpenAI or safetensors source converted to "hf" or "openai" holds
one tensor at a time; a `.ckpt` or `pytorch_model.bin` source is loaded
whole (torch.load has no other way), and a "ckpt" destination is one state
dict, so those hold one copy of the model, never two.

Writing: DST is claimed first (utils/dir_claim.py: created if new, locked,
so a second conversion into it stops at once), then built in a staging
folder inside DST (its own filesystem, even for a mount point) and only once
complete its files moved in one by one (config.json or `checkpoint`, which
make the directory a model for readers, last). So a failure part-way (a bad
tensor found late, a full disk) leaves DST as it was. Nothing written may be
a file the run reads (utils/output_safety.py). DST must be new or empty;
with force, the files this conversion writes replace those of the same name
and every other file is left as it was, but a DST holding a model of the
other format is still refused (the two would be ambiguous), as is a
directory where a file of ours goes. A "ckpt" DST is one file, written
atomically, replacing an existing one only with force.
"""
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.checkpoints.hf_dir import HF_DIR_FILES
from utils.checkpoints.hf_names import (hf_name_of_openai, hf_tensor_shapes, openai_of_hf_tensors,
                             texar_of_hf_tensor, texar_to_hf_tensors, tie_output_layer)
from utils.model import check_sizes, hparams_from_sizes
from utils.checkpoints.weight_checks import check_checkpoint_weights, check_dtype, check_tensor
from utils.processor import ENCODER_FILE, MERGES_FILE, SHIPPED_VOCAB_FILES, get_encoder, \
    vocab_files
from utils.checkpoints.hf_hub import fetch_hub_model
from utils.checkpoints.hf_hub import is_hub_name
from utils.checkpoints.hf_dir import detect_format
from utils.checkpoints.openai_files import HPARAMS_FILE, INDEX_FILE, MODEL_FILES
from utils.checkpoints.tf_reader import STATE_FILE
from utils.model import model_size
from utils.checkpoints.weights import checkpoint_with_memory
from utils.checkpoints.weights import hparams_from_checkpoint
from utils.checkpoints.weights import load_checkpoint, load_weights, resolve_model
from utils.lora import is_adapter_checkpoint
from utils.checkpoints.openai_weights import read_openai_hparams
from utils.checkpoints.openai_weights import is_ignorable_tf_variable
from utils.checkpoints.tf_reader import TFCheckpointReader
from utils.checkpoints.tf_reader import resolve_checkpoint_prefix
from utils.checkpoints.hf_dir import iter_hf_tensors
from utils.checkpoints.hf_dir import read_hf_config
from utils.checkpoints.hf_dir import write_hf_dir
from utils.checkpoints.tf_writer import write_tf_checkpoint_dir
from utils.checkpoints.weights import CHECKPOINT_FORMAT
from utils.checkpoints.weights import checkpoint_model_fields
from utils.checkpoints.weights import save_checkpoint
from utils.dir_claim import check_directory_target
from utils.dir_claim import is_bookkeeping
from utils.output_safety import refuse_existing_output
from utils.output_safety import refuse_outputs_on_inputs
from utils.processor import SHIPPED_VOCAB_DIR
from utils.dir_claim import DirectoryClaim, FileClaim

FORMATS = ("hf", "openai", "ckpt")
HfTensors = Iterator[Tuple[str, torch.Tensor]]
# Old transformers releases saved attention masks beside the weights: not weights.
_HF_EXTRAS = (".attn.bias", ".attn.masked_bias")
# The file that makes a directory a model of each format, written last.
_MARKER = {"hf": "config.json", "openai": STATE_FILE}
# Files that make a directory a model of a format, for detect_format.
_MODEL_FILES = {"hf": ("config.json",), "openai": (STATE_FILE, INDEX_FILE)}
# OpenAI's files, the state file (the format's marker) last.
_OPENAI_FILES = tuple(sorted(MODEL_FILES, key=lambda name: name == STATE_FILE))


@dataclass
class Source:
    kind: str                       # "ckpt", "openai", "hf" or "merged" (adapters merged)
    path: str
    sizes: Dict[str, int]
    vocab_dir: Optional[str]        # holds the tokenizer's two files; None: GPT-2's, shipped
    tensors: Callable[[], HfTensors]  # the weights as Hugging Face (name, tensor), lazily

    def describe(self) -> str:
        s = self.sizes
        return (f"{self.path} ({self.kind}: n_layer={s['n_layer']}, n_embd={s['n_embd']}, "
                f"n_head={s['n_head']}, n_ctx={s['n_ctx']}, n_vocab={s['n_vocab']})")


# ---------------------------------------------------------------------------
# Sources

def open_source(src: str, vocab_dir: Optional[str] = None, merge_lora: bool = False,
                lora_base: Optional[str] = None) -> Source:
    """The model at `src`, its format told by its files. `vocab_dir` is the
    vocabulary of a `.ckpt` source (which holds none). An adapter checkpoint
    needs `merge_lora` (its base: the one it names, or `lora_base`)."""
    if is_hub_name(src):
        source = _hf_source(fetch_hub_model(src, weights=True))
    elif os.path.isfile(src):
        source = _ckpt_source(src, vocab_dir, merge_lora, lora_base)
    elif not os.path.exists(src):
        raise UserError(f"SRC {src} does not exist: give a .ckpt file, an OpenAI model "
                        f"directory or a Hugging Face one")
    else:
        source = _hf_source(src) if detect_format(src) == "hf" else _openai_source(src)
    if (merge_lora or lora_base) and source.kind != "merged":
        raise UserError(f"--merge_lora/--lora_base: {src} holds no LoRA adapters, so "
                        f"there is nothing to merge: drop them")
    return source


def _ckpt_source(path: str, vocab_dir: Optional[str], merge_lora: bool,
                 lora_base: Optional[str]) -> Source:
    state = load_checkpoint(path)
    if is_adapter_checkpoint(state):
        if not merge_lora:
            raise UserError(f"{path} holds LoRA adapters, not a whole model: pass "
                            f"--merge_lora to write its base model with them merged")
        del state
        return _merged_source(path, vocab_dir, lora_base)
    sizes = model_size(hparams_from_checkpoint(state, path), path)
    if checkpoint_with_memory(state, path):
        raise UserError(f"{path} keeps cross-attention (memory mode), which GPT-2's "
                        f"OpenAI and Hugging Face formats cannot hold: it can only "
                        f"be used as it is")
    model_state = state.pop("model")
    del state  # the optimizer state, if any, is not converted
    # What generate and train refuse in this file, convert refuses too.
    check_checkpoint_weights(model_state, sizes, False, path)
    if vocab_dir is not None:
        vocab_files(vocab_dir)  # a half vocabulary fails now, not after the weights
    return Source("ckpt", path, sizes, vocab_dir,
                  lambda: texar_to_hf_tensors(model_state, sizes["n_layer"]))


def _merged_source(path: str, vocab_dir: Optional[str], lora_base: Optional[str]) -> Source:
    """An adapter checkpoint merged into its base model (one model in memory)."""
    loaded = load_weights(resolve_model(checkpoint=path, lora_base=lora_base))
    sizes = model_size(loaded.hparams, path)
    model_state = loaded.model.state_dict()
    vocab = vocab_dir if vocab_dir is not None else loaded.vocab_dir
    del loaded
    if vocab is not None:
        vocab_files(vocab)  # a half vocabulary fails now
    return Source("merged", path, sizes, vocab,
                  lambda: texar_to_hf_tensors(model_state, sizes["n_layer"]))


def _openai_source(model_dir: str) -> Source:
    sizes = check_sizes(read_openai_hparams(model_dir), os.path.join(model_dir, HPARAMS_FILE))
    return Source("openai", model_dir, sizes, model_dir,
                  lambda: _openai_tensors(model_dir))


def _openai_tensors(model_dir: str) -> HfTensors:
    with TFCheckpointReader(resolve_checkpoint_prefix(model_dir)) as reader:
        for tf_name in reader.variables():
            if is_ignorable_tf_variable(tf_name):
                continue
            check_dtype(tf_name, reader.tf_dtype(tf_name), model_dir)
            tensor = torch.from_numpy(np.ascontiguousarray(reader.read(tf_name)))
            if tf_name.endswith("/w") and tensor.dim() == 3 and tensor.shape[0] == 1:
                tensor = tensor[0]  # Conv1D [1, in, out] -> transformers' [in, out]
            yield hf_name_of_openai(tf_name), tensor


def _hf_source(model_dir: str) -> Source:
    sizes = read_hf_config(model_dir)
    return Source("hf", model_dir, sizes, model_dir,
                  lambda: iter_hf_tensors(model_dir, sizes))


def _checked(source: Source) -> HfTensors:
    """The source's weights, float32, each checked before it is handed on;
    the tied lm_head and old attention masks left out. Progress on stderr."""
    expected = hf_tensor_shapes(source.sizes)
    seen = set()
    for name, tensor in tqdm(source.tensors(), total=len(expected), desc="convert",
                             unit="tensor", leave=False, disable=None):
        if name == "lm_head.weight" or name.endswith(_HF_EXTRAS):
            continue
        if name not in expected:
            raise UserError(f"{source.path} holds tensor {name}, which a GPT-2 of its "
                            f"sizes does not have: it is not a GPT-2 of those sizes")
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{source.path}: {name} has shape {list(tensor.shape)} but the "
                            f"model's sizes need {list(expected[name])}: the weights "
                            f"do not match the sizes")
        if name in seen:
            raise UserError(f"{source.path} holds tensor {name} twice")
        check_tensor(name, tensor, source.path)
        seen.add(name)
        yield name, tensor.to(torch.float32)
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"{source.path} lacks {len(missing)} weight(s) of its model, "
                        f"e.g. {missing[0]}: it is incomplete")


# ---------------------------------------------------------------------------
# Destinations

def written_paths(dst: str, fmt: str) -> List[str]:
    """The paths a conversion to `fmt` writes (DST itself for a ckpt)."""
    if fmt == "ckpt":
        return [dst]
    return [os.path.join(dst, n) for n in (HF_DIR_FILES if fmt == "hf" else _OPENAI_FILES)]


def check_destination(dst: str, fmt: str, force: bool, src: str,
                      vocab_dir: Optional[str] = None) -> None:
    """Refuse, before anything is read, a DST that cannot or may not be written:
    one that is (or would replace) a file this run reads, an existing one
    without --force, a path of the wrong kind. Called again under the claim."""
    if dst.strip() == "":
        raise UserError("DST is empty: give the path to write")
    if os.path.islink(dst) and not os.path.exists(dst):
        raise UserError(f"DST {dst} is a symbolic link to {os.readlink(dst)}, which does "
                        f"not exist: remove the link or give the path to write")
    inputs = [("SRC", src), ("--vocab_dir", vocab_dir),
              ("the shipped vocabulary", SHIPPED_VOCAB_DIR)]
    if os.path.exists(src) and os.path.exists(dst) and os.path.samefile(src, dst):
        raise UserError(f"DST {dst} is SRC itself, which this run reads: write the "
                        f"conversion elsewhere")
    refuse_outputs_on_inputs([("DST", dst)] + [("DST's file", p) for p in
                                               written_paths(dst, fmt)], inputs)
    if fmt == "ckpt":
        if os.path.isdir(dst):
            raise UserError(f"DST {dst} is a directory: --format ckpt writes one file, "
                            f"e.g. {os.path.join(dst, 'model.ckpt')}")
        refuse_existing_output(dst, "DST", force, "--force")
        return
    check_directory_target(dst, "DST")
    held = sorted(n for n in os.listdir(dst) if not is_bookkeeping(n)) \
        if os.path.isdir(dst) else []
    if held and not force:
        listing = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UserError(f"DST {dst} is not empty (it holds {listing}): pass --force to "
                        f"replace the files this conversion writes, or choose a new "
                        f"directory")
    other = "openai" if fmt == "hf" else "hf"
    clash = [n for n in held if n in _MODEL_FILES[other]]
    if clash:
        raise UserError(f"DST {dst} holds a model in {other} format ({', '.join(clash)}): "
                        f"writing {fmt} beside it would make it ambiguous; choose "
                        f"another directory")
    blocking = [p for p in written_paths(dst, fmt)
                if os.path.lexists(p) and not os.path.islink(p) and not os.path.isfile(p)]
    if blocking:
        raise UserError(f"DST {dst} holds {blocking[0]}, which is not a file (a "
                        f"directory?), where this conversion writes its "
                        f"{os.path.basename(blocking[0])}: move it away, or choose "
                        f"another directory")


def claim_destination(dst: str, fmt: str):
    """The exclusive claim on DST (utils/dir_claim.py) to hold while
    converting: the directory itself, or for a ckpt file the folder it goes
    in (so two runs never both replace it, even with --force)."""
    if fmt == "ckpt":
        return FileClaim(dst, "DST")
    return DirectoryClaim(dst, "DST")


def write_destination(source: Source, dst: str, fmt: str, claim=None,
                      force: bool = False) -> List[str]:
    """Write `source` into `dst` as `fmt`; the paths written, in order. A
    directory is written under `claim` (claim_destination's); a ckpt file
    replaces an existing one only with `force`."""
    if fmt == "ckpt":
        _write_ckpt(source, dst, force)
        return [dst]
    stage = claim.new_stage()
    names = (_write_hf(source, stage) if fmt == "hf" else _write_openai(source, stage))
    claim.publish(stage, names, _MARKER[fmt])
    return [os.path.join(dst, n) for n in names]


def _write_hf(source: Source, directory: str) -> List[str]:
    return write_hf_dir(directory, _checked(source), source.sizes, source.vocab_dir)


def _write_openai(source: Source, directory: str) -> List[str]:
    encoder_file, merges_file = _vocab_files(source)
    write_tf_checkpoint_dir(directory, openai_of_hf_tensors(_checked(source)))
    with atomic_write(os.path.join(directory, HPARAMS_FILE), "w", encoding="utf-8") as f:
        json.dump({k: source.sizes[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head",
                                                "n_layer")}, f, indent=2)
    for path, name in ((encoder_file, ENCODER_FILE), (merges_file, MERGES_FILE)):
        with open(path, "rb") as src, atomic_write(os.path.join(directory, name)) as out:
            shutil.copyfileobj(src, out)
    return list(_OPENAI_FILES)


def _vocab_files(source: Source) -> Tuple[str, str]:
    """The tokenizer's two files, checked to fit the model's embedding."""
    files = (vocab_files(source.vocab_dir) if source.vocab_dir else None) or SHIPPED_VOCAB_FILES
    tokens = len(get_encoder(os.path.dirname(files[0])))
    if tokens > source.sizes["n_vocab"]:
        raise UserError(f"the vocabulary {files[0]} has {tokens} tokens but the model "
                        f"only {source.sizes['n_vocab']}")
    return files


def _write_ckpt(source: Source, path: str, force: bool = False) -> None:
    n_layer = source.sizes["n_layer"]
    state: Dict[str, torch.Tensor] = {}
    for name, tensor in _checked(source):
        state.update(texar_of_hf_tensor(name, tensor, n_layer))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    save_checkpoint(path, {"model": tie_output_layer(state), "format": CHECKPOINT_FORMAT,
                           **checkpoint_model_fields(hparams_from_sizes(source.sizes))},
                    replace=force)
