"""The prepared splits a gpt2_train_main.py run reads, checked before any step.

Each split must have been prepared with the training config's max_seq_length,
fit the model's positions, and hold only ids of the model's vocabulary (an id
out of range would index past the embedding: a crash mid-run, or on a GPU an
unreadable device assert).
"""
import os
import sys

import numpy as np

from utils.data.records import IDS_FIELD, PreparedSplit, split_data_path
from utils.errors import UserError


def open_splits(args, cfg):
    """The prepared splits the requested steps need, checked before the model loads."""
    wanted = {"train": args.do_train, "dev": args.do_eval, "test": args.do_test}
    if args.do_train and cfg.eval_steps > 0 and not args.do_eval:
        # Evaluation during training uses dev.npy when there is one.
        wanted["dev"] = os.path.isfile(split_data_path(cfg.data_dir, "dev"))
        if not wanted["dev"]:
            print(f"note: no {split_data_path(cfg.data_dir, 'dev')}: no dev evaluation "
                  f"during training (prepare a dev.txt to get one)", file=sys.stderr)
    splits = {}
    for name, needed in wanted.items():
        if not needed:
            splits[name] = None
            continue
        split = PreparedSplit(split_data_path(cfg.data_dir, name))
        if split.max_seq_length != cfg.max_seq_length:
            raise UserError(f"{split.path} was prepared with max_seq_length "
                            f"{split.max_seq_length} but {cfg.name} says "
                            f"{cfg.max_seq_length}: set max_seq_length = "
                            f"{split.max_seq_length} in the config, or run "
                            f"prepare_data.py --max_seq_length {cfg.max_seq_length}")
        if name != "test" and split.conditional:
            check_pairs_have_targets(name, split)
        splits[name] = split
    return splits


def check_pairs_have_targets(name: str, split) -> None:
    """Training and dev pairs need a target (only test.tsv may leave it out)."""
    empty = np.flatnonzero(split.lengths <= split.target_starts)
    if len(empty):
        raise UserError(f"the {name} split {split.path} holds sources without a "
                        f"target (example {int(empty[0])} counting from 0): "
                        f"{name} pairs need source<TAB>target; prepare a "
                        f"{name}.tsv with both")


def check_splits_fit_model(splits, n_ctx: int, n_vocab: int) -> None:
    """Every opened split fits the model's positions and vocabulary."""
    for name, split in splits.items():
        if split is None:
            continue
        if split.max_seq_length > n_ctx:
            raise UserError(f"{split.path} holds sequences of up to {split.max_seq_length} "
                            f"tokens but the model has {n_ctx} positions: prepare the "
                            f"data with --max_seq_length {n_ctx} or less")
        check_token_ids(name, split, n_vocab)


def check_token_ids(name: str, split, n_vocab: int) -> None:
    """Every real token of `split` must be an id of the model's vocabulary:
    an id out of range would index past the embedding (a crash mid-run, or
    on a GPU an unreadable device assert). Checked in bounded memory."""
    ids_on_disk = np.load(split.path, mmap_mode="r", allow_pickle=False)[IDS_FIELD]
    positions = np.arange(split.max_seq_length)
    rows = max(1, (1 << 22) // split.max_seq_length)
    for start in range(0, len(split), rows):
        ids = np.asarray(ids_on_disk[start:start + rows])
        real = positions[None, :] < split.lengths[start:start + rows, None]
        bad = real & ((ids >= n_vocab) | (ids < 0))
        if bad.any():
            row, position = np.argwhere(bad)[0]
            raise UserError(
                f"the {name} split {split.path} holds token id {int(ids[row, position])} "
                f"(example {start + int(row)} counting from 0, position {int(position)}), "
                f"outside the model's vocabulary of {n_vocab} ids (0 to {n_vocab - 1}): "
                f"prepare the data with the model's vocabulary, or use a model whose "
                f"n_vocab covers it")

