"""Shared code for the GPT-2 scripts: tokenizer, checkpoints, data, decoding."""
