"""Every format GPT-2 weights come in and go out in, and which weights a run uses.

Owns: our own `.ckpt` and the resolution of a run's weight flags (weights),
OpenAI's TensorFlow files (tf_reader, tf_writer, crc32c, openai_files for the
seven file names and what a usable file is, download, openai_weights for
their mapping onto texar's names), Hugging Face directories and the hub
(hf_dir, hf_names, hf_hub), the conversions between them (convert), and
the one check every loaded tensor passes: dtype, names, shapes and
finiteness (weight_checks);
streaming any of them into a model one tensor at a time, each checked,
never held twice (streaming, pages); writing a .ckpt one tensor at a time
(streamed_save).
May import: the root modules (errors, atomic, memory, processor, model).
"""
