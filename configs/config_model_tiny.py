"""A small GPT-2 for the offline demo and the tests: trains in minutes on a CPU.

Same architecture and vocabulary as the released models, far fewer parameters
(about 7.3M, most of them the 50,257-entry token embedding).
"""
from utils.model import gpt2_hparams

n_vocab = 50257  # the official GPT-2 BPE vocabulary
n_ctx = 256
n_embd = 128
n_head = 4
n_layer = 4

hparams = gpt2_hparams(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd,
                       n_head=n_head, n_layer=n_layer)
