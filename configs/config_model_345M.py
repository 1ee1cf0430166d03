"""GPT-2 345M (also known as 355M, gpt2-medium): OpenAI's released model of this size.

The five numbers are those of OpenAI's hparams.json for this model; `hparams`
is the texar-pytorch GPT2Decoder configuration built from them.
"""
from utils.model import gpt2_hparams

n_vocab = 50257   # BPE vocabulary, <|endoftext|> included
n_ctx = 1024     # positions: the longest sequence the model can read
n_embd = 1024    # width of every hidden state
n_head = 16    # attention heads per layer
n_layer = 24   # transformer blocks

hparams = gpt2_hparams(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd,
                       n_head=n_head, n_layer=n_layer)
