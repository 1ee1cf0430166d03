"""The data pipeline of prepare_data.py and what training reads back.

Owns: reading text files line by line in bounded memory (text_lines), the
record format of `<split>.npy` and reading it in batches (records),
encoding a split into records (prepare), packing a whole split into full
windows (pack), source<TAB>target pairs (pairs), and writing records whose
count is known only at the end, with the dev split held out (split_output),
and the settings a directory was prepared with, prepared.json (data_info).
May import: the root modules (errors, atomic, json_file, processor).
"""
