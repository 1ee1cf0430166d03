"""Encode a text corpus with GPT-2's BPE for gpt2_train_main.py.

    python prepare_data.py --data_dir data/toy
        [--max_seq_length 128] [--output_dir data/toy]
        [--pretrain_model_dir gpt2_pretrained_models/model_117M]

--data_dir holds any of train.txt, dev.txt, test.txt, one example per line,
or, for conditional fine-tuning, train.tsv, dev.tsv, test.tsv with one
source<TAB>target pair per line (see utils/pairs.py; not both kinds at once)
(lines end at \n, \r\n or \r, and at the other breaks of Python's
str.splitlines: \v \f \x1c-\x1e \x85 \u2028 \u2029).
Each non-empty line becomes <|endoftext|> + BPE(line) + <|endoftext|>, cut to
--max_seq_length tokens (the two special tokens included) and padded. Each
split is written to <output_dir>/<split>.npy (see utils/data.py for the
format, utils/prepare.py for the writing), replacing any earlier one only
once complete. All the text files are checked first, so a bad one changes
nothing; Ctrl-C or SIGTERM keeps the splits already written and leaves no
temporary file. A line too long to hold in memory is read only as far as its
first tokens need.
"""
import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from utils.errors import UserError, run_main
from utils.model_files import DEFAULT_MODEL, default_model_dir

DEFAULT_PRETRAIN_MODEL_DIR = default_model_dir(DEFAULT_MODEL)


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
    if os.path.exists(pretrain_model_dir) and not os.path.isdir(pretrain_model_dir):
        raise UserError(f"--pretrain_model_dir {pretrain_model_dir} is a file: give the "
                        f"model directory that holds {ENCODER_FILE} and vocab.bpe")
    if not os.path.isdir(pretrain_model_dir):
        raise UserError(f"--pretrain_model_dir {pretrain_model_dir} does not exist: "
                        f"give a GPT-2 model directory, or leave the flag out to "
                        f"use the shipped vocabulary")
    if os.path.isfile(os.path.join(pretrain_model_dir, ENCODER_FILE)):
        return pretrain_model_dir, f"the vocabulary in {pretrain_model_dir}"
    return pretrain_model_dir, (f"the GPT-2 vocabulary shipped in {SHIPPED_VOCAB_DIR} "
                                f"({pretrain_model_dir} has none)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


@contextmanager
def sigterm_raises_terminated():
    """While in the block, SIGTERM raises Terminated (only in the main thread)."""
    def terminate(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def split_files(data_dir):
    """{split: its text file} for the splits in `data_dir`, in SPLITS order:
    all .txt (one example per line) or all .tsv (source<TAB>target pairs)."""
    from utils.data import SPLITS, split_pairs_path, split_text_path
    found = {}
    for split in SPLITS:
        for path in (split_text_path(data_dir, split), split_pairs_path(data_dir, split)):
            if os.path.isfile(path):
                found[split] = found.get(split, ()) + (path,)
            elif os.path.lexists(path):  # a directory, a pipe, a device, a broken link
                what = "a broken link" if not os.path.exists(path) else "not a regular file"
                raise UserError(f"{path} is {what}: make it the {split} "
                                f"examples, one per line, or move it away")
    if not found:
        raise UserError(f"{data_dir} has none of train.txt, dev.txt, test.txt (or "
                        f"train.tsv, dev.tsv, test.tsv): put the examples there, "
                        f"one per line")
    kinds = {os.path.splitext(path)[1] for paths in found.values() for path in paths}
    if len(kinds) > 1:
        both = sorted(os.path.basename(p) for paths in found.values() for p in paths)
        raise UserError(f"{data_dir} holds both .txt and .tsv splits ({', '.join(both)}): "
                        f"a data dir is either plain text or source<TAB>target pairs; "
                        f"move one kind to another directory")
    return {split: paths[0] for split, paths in found.items()}


def check_num_workers(num_workers):
    from utils.prepare import default_num_workers
    most = max(default_num_workers(), os.cpu_count() or 1)
    if num_workers is not None and not 1 <= num_workers <= most:
        raise UserError(f"--num_workers must be 1 to {most}, this machine's cores "
                        f"(got {num_workers}); leave it out to use them all")


def main(argv=None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return prepare(args)  # signal handlers can only be set in the main thread
    with sigterm_raises_terminated():
        try:
            return prepare(args)
        except Terminated:
            # prepare() said what was written; files are cleaned up like on Ctrl-C.
            print("terminated", file=sys.stderr)
            return 128 + signal.SIGTERM


def check_input(path, progress):
    """Check a split's text file in full; its (examples, empty lines)."""
    from utils.pairs import check_pairs_file
    from utils.text_lines import check_text_file
    return check_pairs_file(path) if path.endswith(".tsv") else \
        check_text_file(path, progress)


def describe_summary(s, max_seq_length):
    """One line of the final summary for a prepared split."""
    line = (f"{s.split}: {s.examples:,} examples, {s.tokens:,} tokens (longest "
            f"{s.longest}), ")
    if s.pair_cuts is None:
        line += f"{s.truncated:,} truncated to {max_seq_length}, "
    else:
        cuts = s.pair_cuts
        line += f"{cuts.sources:,} sources cut from the start to fit {max_seq_length}, "
        if cuts.targets:
            line += (f"{cuts.targets:,} targets too long to fit whole (first at line "
                     f"{cuts.first_target_line}: kept their start, unclosed; raise "
                     f"--max_seq_length or shorten them), ")
    return line + f"{s.skipped:,} empty lines skipped -> {s.path}"


def prepare(args) -> int:
    from utils.data import check_max_seq_length, split_data_path
    from utils.pairs import check_pair_seq_length
    from utils.prepare import prepare_output_dir, prepare_split

    check_max_seq_length(args.max_seq_length)
    check_num_workers(args.num_workers)
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} is not a directory")
    inputs = split_files(args.data_dir)
    splits = list(inputs)
    if any(path.endswith(".tsv") for path in inputs.values()):
        check_pair_seq_length(args.max_seq_length)
    output_dir = args.data_dir if args.output_dir is None else args.output_dir
    prepare_output_dir(output_dir)  # before hours of encoding, not after
    for split in splits:
        out_path = split_data_path(output_dir, split)
        if os.path.isdir(out_path):
            raise UserError(f"{out_path} is a directory: move it away, or give "
                            f"another --output_dir")
    vocab_dir, vocab_label = vocab_dir_and_label(args.pretrain_model_dir)
    print(f"Encoding {', '.join(os.path.basename(p) for p in inputs.values())} from "
          f"{args.data_dir} "
          f"with {vocab_label}; max_seq_length {args.max_seq_length}.", file=sys.stderr)

    start = time.time()
    summaries = []
    try:
        # Every split checked before any is written: a bad file changes nothing.
        counts = {split: check_input(inputs[split], not args.quiet) for split in splits}
        for split in splits:
            summaries.append(prepare_split(
                inputs[split], split_data_path(output_dir, split),
                max_seq_length=args.max_seq_length, vocab_dir=vocab_dir,
                num_workers=args.num_workers, progress=not args.quiet,
                counts=counts[split]))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as Terminated
        # Splits are written in order, each atomically: name what is done.
        done = ", ".join(f"{s}.npy" for s in splits[:len(summaries)])
        left = ", ".join(f"{s}.npy" for s in splits[len(summaries):])
        print(f"interrupted: {left} not written" + (f"; {done} complete" if done else ""),
              file=sys.stderr)
        raise
    for s in summaries:
        print(describe_summary(s, args.max_seq_length))
    print(f"Done in {time.time() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    run_main(main)
