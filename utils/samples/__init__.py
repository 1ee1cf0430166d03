"""Prompts in, samples out.

Owns: prompts from flags and files continued in shared batches (prompts),
where samples go: the screen's format, JSONL or TSV (output), the
interactive session's terminal side (interactive), the test split's
continuations written by `--do_test` (test_split), and samples from fixed
prompts during training (during_training).
May import: the root modules, utils/data (the prepared splits and what
prepare_data.py recorded) and utils/decoding.
"""
