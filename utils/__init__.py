"""Shared code of the entry scripts, grouped by job.

At the root, what every package uses: errors (one-line user errors),
atomic (atomic writes, one writer per output), output_safety (no output
onto an input, no silent overwrite), dir_claim (one writer per output
directory, staged on its filesystem), input_files and json_file (reading
what users hand us, bounded), memory (estimates and refusals), device
(--device), processor (GPT-2's BPE, with gpt2_vocab/), config_modules
(loading configs/*.py and checking their names), model (building texar's
GPT2Decoder from its sizes; fused_attention and fused_gelu are the training
forward it installs), lora (LoRA adapters and their checkpoint
fields, used by checkpoints and training), and flags (the entry scripts'
shared flags; no package imports it).

The packages, each importing only the root and the packages listed before
it:
  checkpoints/  every weights format in and out, and which weights a run uses
  data/         text in, prepared records out
  decoding/     the engine and the ways of choosing tokens (loading.py reads
                a model for decoding through checkpoints/)
  samples/      prompts in, samples out (uses data and decoding)
  serving/      the OpenAI-compatible HTTP server (uses decoding)
  training/     the fine-tuning loop and what it keeps (uses all of the above)
tests/test_import_graph.py keeps it so.
"""
