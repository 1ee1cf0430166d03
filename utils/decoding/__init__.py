"""The decoding engine and the ways of choosing the next token.

Owns: the engine (engine: forward pass with a KV cache), its kernels
(linear for float layers, int8_linear for `--dtype int8`, weight_arena for
huge-page weights, compiled_step and compiling for the torch.compile
batch-1 step, load_targets for where streamed weights land), turning
logits into tokens (sampling), generation with sampling, greedy and beam search (generation), stop texts (stop_text), and
the rules a decoding run must meet: values, lengths and memory (limits,
settings), and a model loaded for decoding as the entry scripts load it
(loading).
May import: the root modules and utils/checkpoints (for loading).
"""
