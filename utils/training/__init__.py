"""The fine-tuning loop of gpt2_train_main.py and everything it keeps.

Owns: the trainer (trainer), the training config and its checks (config),
the language-model loss, evaluation and learning-rate schedule (lm), the
optimizer (optimizer), divergence detection (divergence), RNG states for
exact resume (rng_state), the metrics log (metrics_log), memory options
(memory_options), the output directory's rules (output_dir), the prepared
splits a run reads (train_data), what a resumed run changed
(resume_settings), distributed launch (distributed), sharded data parallel
with FSDP (sharding) and its Adafactor (sharded_adafactor), a LoRA run's adapters and resume rules
(lora_training), the training loss's fused cross-entropy
(fused_cross_entropy), `compile = True` (compiled_forward) and glibc's heap
setting that keeps freed memory from staying resident (heap).
May import: the root modules and every other package (checkpoints, data,
decoding, samples); nothing imports it but gpt2_train_main.py.
"""
