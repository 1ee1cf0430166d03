"""Encode a text corpus with GPT-2's BPE for gpt2_train_main.py.

    python prepare_data.py --data_dir data/toy
        [--max_seq_length 128] [--output_dir data/toy]
        [--pretrain_model_dir gpt2_pretrained_models/model_117M]

--data_dir holds any of train.txt, dev.txt, test.txt, one example per line.
Each non-empty line becomes <|endoftext|> + BPE(line) + <|endoftext|>, cut to
--max_seq_length tokens (the two special tokens included) and padded. Each
split is written to <output_dir>/<split>.npy (see utils/data.py for the
format), replacing any earlier one only once complete. All the text files are
checked first, so a bad one changes nothing; Ctrl-C keeps the splits already
written.
"""
import argparse
import os
import sys
import time

from utils.errors import UserError, run_main

DEFAULT_PRETRAIN_MODEL_DIR = os.path.join("gpt2_pretrained_models", "model_117M")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/toy",
                        help="Directory with train.txt, dev.txt and/or test.txt.")
    parser.add_argument("--max_seq_length", type=int, default=128,
                        help="Most tokens per example, both <|endoftext|> included; "
                             "longer lines are cut (default 128).")
    parser.add_argument("--output_dir", "--tfrecord_output_dir", dest="output_dir",
                        default=None,
                        help="Where <split>.npy go (default: --data_dir). "
                             "--tfrecord_output_dir is accepted as an alias.")
    parser.add_argument("--pretrain_model_dir", default=None,
                        help="Model directory whose encoder.json and vocab.bpe are "
                             f"used (default: {DEFAULT_PRETRAIN_MODEL_DIR}, or the "
                             "vocabulary shipped in utils/gpt2_vocab/ when that "
                             "directory is absent).")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="Processes for BPE encoding (default: all cores).")
    parser.add_argument("--quiet", action="store_true",
                        help="No progress bars, only the summary (bars are also off "
                             "when stderr is not a terminal).")
    return parser.parse_args(argv)


def vocab_dir_and_label(pretrain_model_dir):
    """The directory to pass to get_encoder, and a description for the log."""
    from utils.processor import ENCODER_FILE, SHIPPED_VOCAB_DIR
    if pretrain_model_dir is None:
        # The original's default, when it has been downloaded; else our copy
        # of the same vocabulary, so the toy pipeline runs offline.
        if os.path.isfile(os.path.join(DEFAULT_PRETRAIN_MODEL_DIR, ENCODER_FILE)):
            pretrain_model_dir = DEFAULT_PRETRAIN_MODEL_DIR
        else:
            return None, f"the GPT-2 vocabulary shipped in {SHIPPED_VOCAB_DIR}"
    if not os.path.isdir(pretrain_model_dir):
        raise UserError(f"--pretrain_model_dir {pretrain_model_dir} does not exist: "
                        f"give a GPT-2 model directory, or leave the flag out to "
                        f"use the shipped vocabulary")
    if os.path.isfile(os.path.join(pretrain_model_dir, ENCODER_FILE)):
        return pretrain_model_dir, f"the vocabulary in {pretrain_model_dir}"
    return pretrain_model_dir, (f"the GPT-2 vocabulary shipped in {SHIPPED_VOCAB_DIR} "
                                f"({pretrain_model_dir} has none)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from utils.data import (SPLITS, check_max_seq_length, check_text_file,
                            prepare_output_dir, prepare_split, split_data_path,
                            split_text_path)

    check_max_seq_length(args.max_seq_length)
    if args.num_workers is not None and args.num_workers < 1:
        raise UserError(f"--num_workers must be at least 1 (got {args.num_workers})")
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} is not a directory")
    splits = [s for s in SPLITS if os.path.isfile(split_text_path(args.data_dir, s))]
    if not splits:
        raise UserError(f"{args.data_dir} has none of train.txt, dev.txt, test.txt: "
                        f"put the examples there, one per line")
    output_dir = args.data_dir if args.output_dir is None else args.output_dir
    prepare_output_dir(output_dir)  # before hours of encoding, not after
    vocab_dir, vocab_label = vocab_dir_and_label(args.pretrain_model_dir)
    print(f"Encoding {', '.join(s + '.txt' for s in splits)} from {args.data_dir} "
          f"with {vocab_label}; max_seq_length {args.max_seq_length}.", file=sys.stderr)

    start = time.time()
    summaries = []
    try:
        # Every split checked before any is written: a bad file changes nothing.
        counts = {split: check_text_file(split_text_path(args.data_dir, split),
                                         not args.quiet) for split in splits}
        for split in splits:
            summaries.append(prepare_split(
                split_text_path(args.data_dir, split), split_data_path(output_dir, split),
                max_seq_length=args.max_seq_length, vocab_dir=vocab_dir,
                num_workers=args.num_workers, progress=not args.quiet,
                counts=counts[split]))
    except KeyboardInterrupt:
        # Splits are written in order, each atomically: name what is done.
        done = ", ".join(f"{s}.npy" for s in splits[:len(summaries)])
        left = ", ".join(f"{s}.npy" for s in splits[len(summaries):])
        print(f"interrupted: {left} not written" + (f"; {done} complete" if done else ""),
              file=sys.stderr)
        raise
    for s in summaries:
        print(f"{s.split}: {s.examples:,} examples, {s.tokens:,} tokens (longest "
              f"{s.longest}), {s.truncated:,} truncated to {args.max_seq_length}, "
              f"{s.skipped:,} empty lines skipped -> {s.path}")
    print(f"Done in {time.time() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    run_main(main)
