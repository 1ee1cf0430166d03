"""The training config's memory options: what they do to the model.

gradient_checkpointing = True
    Each transformer block keeps only its input for backward and recomputes
    its activations there (torch.utils.checkpoint, non-reentrant). Activation
    memory drops from every block's intermediates (attention scores and
    probabilities, the 4x feed-forward) to one block's worth plus a
    [batch, length, n_embd] tensor per block; a step costs about one more
    forward. The gradients are the same: the recomputation replays the random
    state, so dropout masks are identical.

trainable = "transformer"
    Freezes the token and position embeddings (gpt-2-simple's
    only_train_transformer_layers). GPT-2's output layer is the token
    embedding transposed, so it is frozen too. Frozen parameters get no
    gradient and no optimizer state: for 1558M that is 82M parameters fewer,
    about 1 GB less with AdamW (gradient + two moments).

The optimizer (AdamW, Adafactor, SGD...) is chosen by `opt` (utils/training/optimizer.py)
and the autocast precision by `precision` (utils/training/lm.py).
"""
import types
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

TRAINABLE = ("all", "transformer")


def apply_memory_options(model: nn.Module, gradient_checkpointing: bool,
                         trainable: str) -> None:
    """Set up the plain GPT2Decoder `model` as the config says (before the
    optimizer is built: it sees only the parameters left trainable)."""
    if trainable == "transformer":
        freeze_embeddings(model)
    elif trainable != "all":
        raise ValueError(f"trainable must be one of {TRAINABLE}, not {trainable!r}")
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)


def freeze_embeddings(model: nn.Module) -> None:
    """No gradients for the token and position embeddings (and so for the
    output layer that shares the token embedding)."""
    for embedder in (model.word_embedder, model.position_embedder):
        for param in embedder.parameters():
            param.requires_grad_(False)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Make the decoder's training forward checkpoint each block.

    texar's TransformerDecoder runs its blocks in a loop inside
    `_self_attention_stack`; this instance gets its own version of that
    method which runs the same arithmetic block by block under `checkpoint`
    when it is training without a cache or encoder memory (the training
    path). Generation (a cache) and evaluation (no grad) take texar's method.
    """
    decoder = model.decoder
    texar_stack = decoder._self_attention_stack  # bound to this instance

    def stack(self, inputs, memory, decoder_self_attention_bias=None,
              memory_attention_bias=None, cache=None):
        if (cache is not None or memory is not None or not self.training
                or not torch.is_grad_enabled()):
            return texar_stack(inputs, memory, decoder_self_attention_bias,
                               memory_attention_bias, cache)
        x = self.embed_dropout(inputs)
        for i in range(self._hparams.num_blocks):
            x = checkpoint(_block, self, i, x, decoder_self_attention_bias,
                           use_reentrant=False)
        return self.final_layer_norm(x)

    decoder._self_attention_stack = types.MethodType(stack, decoder)


def _block(decoder, i: int, x: torch.Tensor,
           bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Block i of texar's TransformerDecoder._self_attention_stack (no encoder
    memory): the same operations in the same order."""
    attended = decoder.self_attns[i](
        queries=decoder.self_attn_layer_norm[i](x), memory=None,
        memory_attention_bias=bias, cache=None)
    x = x + decoder.residual_dropout(attended)
    fed = decoder.poswise_networks[i](decoder.poswise_layer_norm[i](x))
    return x + decoder.residual_dropout(fed)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
