"""Build texar's GPT2Decoder from GPT-2's five size numbers.

OpenAI describes each GPT-2 model with five numbers (its `hparams.json`):
n_vocab, n_ctx, n_embd, n_head, n_layer. texar-pytorch wants a nested hparams
dict. `gpt2_hparams` makes the second from the first, `model_size` goes back,
and `build_model` constructs the decoder.

texar's TransformerDecoder always creates an encoder-decoder attention block
per layer, which GPT-2 never uses (there is no encoder memory). `build_model`
drops those modules so the model holds exactly OpenAI's parameters: 124,439,808
for the 117M/124M model instead of 152,770,560. They are never called when no
`memory` is passed, and removing them saves the memory and optimizer state.
"""
import copy
import warnings
from typing import Any, Dict

import torch
from torch import nn

from utils.config_loading import load_config_module
from utils.errors import UserError

SIZE_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def gpt2_hparams(n_vocab: int, n_ctx: int, n_embd: int, n_head: int,
                 n_layer: int, dropout: float = 0.0) -> Dict[str, Any]:
    """texar GPT2Decoder hparams for a GPT-2 of the given size.

    The feed-forward block is Linear(4*n_embd) -> GPT GELU -> Linear, as in
    GPT-2. `dropout` applies to embeddings, residuals and attention weights;
    the released GPT-2 models were evaluated without it.
    """
    sizes = dict(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head,
                 n_layer=n_layer)
    bad = [f"{k}={v!r}" for k, v in sizes.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise UserError(f"GPT-2 sizes must be positive integers: {', '.join(bad)}")
    if n_embd % n_head:
        raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
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


def hparams_from_openai(openai_hparams: Dict[str, Any]) -> Dict[str, Any]:
    """texar hparams from the dict in an OpenAI model directory's hparams.json."""
    missing = [k for k in SIZE_KEYS if k not in openai_hparams]
    if missing:
        raise UserError(f"hparams.json lacks {', '.join(missing)}: "
                        f"it must hold {', '.join(SIZE_KEYS)}")
    sizes = {}
    for k in SIZE_KEYS:
        try:
            sizes[k] = int(openai_hparams[k])
        except (TypeError, ValueError):
            raise UserError(f"hparams.json has {k}={openai_hparams[k]!r}: it must "
                            f"be a whole number; re-download the model files") from None
    return gpt2_hparams(**sizes)


def model_size(hparams: Dict[str, Any]) -> Dict[str, int]:
    """The five OpenAI size numbers of a texar GPT2Decoder hparams dict."""
    dec = hparams["decoder"]
    return {
        "n_vocab": int(hparams["vocab_size"]),
        "n_ctx": int(hparams["position_size"]),
        "n_embd": int(dec["dim"]),
        "n_head": int(dec["multihead_attention"]["num_heads"]),
        "n_layer": int(dec["num_blocks"]),
    }


def check_sizes_agree(config_hparams: Dict[str, Any],
                      openai_hparams: Dict[str, Any], config_name: str,
                      hparams_path: str) -> None:
    """Raise a UserError naming both values when a config and hparams.json differ."""
    ours = model_size(config_hparams)
    theirs = {k: int(openai_hparams[k]) for k in SIZE_KEYS if k in openai_hparams}
    diffs = [f"{k}={ours[k]} in {config_name} but {theirs[k]} in {hparams_path}"
             for k in SIZE_KEYS if k in theirs and ours[k] != theirs[k]]
    if diffs:
        raise UserError("the model config does not match the checkpoint: "
                        + "; ".join(diffs)
                        + " (pick the matching --config_model, or leave it out "
                          "to use hparams.json)")


def load_model_hparams(config_name: str) -> Dict[str, Any]:
    """The `hparams` dict of a model config module (name or .py path)."""
    module = load_config_module(config_name)
    hparams = getattr(module, "hparams", None)
    if not isinstance(hparams, dict):
        raise UserError(f"model config {config_name} must define a dict named "
                        f"'hparams' (see configs/config_model_117M.py)")
    try:
        model_size(hparams)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"model config {config_name}: 'hparams' is not a complete "
                        f"GPT2Decoder hparams dict (no {err}); build it with "
                        f"utils.model.gpt2_hparams as configs/config_model_117M.py "
                        f"does") from None
    return copy.deepcopy(hparams)


def build_model(hparams: Dict[str, Any]) -> nn.Module:
    """A randomly initialised texar GPT2Decoder holding only GPT-2's parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # texar's import-time deprecation noise
        from texar.torch.modules import GPT2Decoder
    hparams = copy.deepcopy(hparams)
    hparams["pretrained_model_name"] = None
    model = GPT2Decoder(hparams=hparams)
    # GPT-2 has no encoder: drop the cross-attention texar builds regardless.
    model.decoder.enc_dec_attns = nn.ModuleList()
    model.decoder.end_dec_attn_layer_norm = nn.ModuleList()
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (the output layer shares the embedding)."""
    return sum(p.numel() for p in model.parameters())


def default_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
