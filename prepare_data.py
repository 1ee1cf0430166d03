"""Encode a text corpus with GPT-2's BPE for gpt2_train_main.py.

    python prepare_data.py --data_dir data/toy
        [--max_seq_length 128] [--output_dir data/toy]
        [--pretrain_model_dir gpt2_pretrained_models/model_117M]

--data_dir holds any of train.txt, dev.txt, test.txt, one example per line,
or, for conditional fine-tuning, train.tsv, dev.tsv, test.tsv with one
source<TAB>target pair per line (see utils/data/pairs.py; not both kinds at once)
(lines end at \n, \r\n or \r, and at the other breaks of Python's
str.splitlines: \v \f \x1c-\x1e \x85 \u2028 \u2029).
Each non-empty line becomes <|endoftext|> + BPE(line) + <|endoftext|>, cut to
--max_seq_length tokens (the two special tokens included) and padded. Each
split is written to <output_dir>/<split>.npy (see utils/data/records.py for the
format, utils/data/prepare.py for the writing), replacing any earlier one only
once complete, and the settings (max_seq_length, --pack, pairs or lines)
to <output_dir>/prepared.json, which gpt2_train_main.py reads (utils/data/
data_info.py). All the text files are checked first, so a bad one changes
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
from utils.checkpoints.openai_files import DEFAULT_MODEL, default_model_dir
from utils.checkpoints.hf_hub import fetch_hub_model
from utils.checkpoints.hf_hub import is_hub_name
from utils.processor import ENCODER_FILE
from utils.processor import SHIPPED_VOCAB_DIR
from utils.processor import vocab_files
from utils.data.records import SPLITS
from utils.data.records import split_pairs_path
from utils.data.records import split_text_path
from utils.data.prepare import default_num_workers
from utils.data.split_output import check_dev_fraction
from utils.data.pairs import check_pair_seq_length
from utils.data.pairs import check_pairs_file
from utils.data.text_lines import check_text_file
from utils.data.records import check_max_seq_length
from utils.data.records import split_data_path
from utils.data.prepare import prepare_output_dir
from utils.data.pack import pack_split
from utils.data.prepare import prepare_split
from utils.data.split_output import hold_out_lines
from utils.output_safety import refuse_outputs_on_inputs
from utils.data.data_info import write_data_info

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
                        help="Where <split>.npy go (default: --data_dir); existing "
                             "<split>.npy there are replaced, and none may be a "
                             "file this run reads. --tfrecord_output_dir is "
                             "accepted as an alias.")
    parser.add_argument("--pretrain_model_dir", default=None,
                        help="Model directory whose encoder.json and vocab.bpe "
                             "(or a Hugging Face directory's vocab.json and "
                             "merges.txt; or hf:NAME) are used (default: {DEFAULT_PRETRAIN_MODEL_DIR}, or the "
                             "vocabulary shipped in utils/gpt2_vocab/ when that "
                             "directory is absent).")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="Processes for BPE encoding (default: all cores).")
    parser.add_argument("--pack", action="store_true",
                        help="Treat each file as one text stream, newlines kept "
                             "(<|endoftext|> in the text separates documents), "
                             "cut into consecutive windows of --max_seq_length "
                             "tokens: for books, articles and notes.")
    parser.add_argument("--dev_fraction", type=float, default=None,
                        help="Hold out this fraction of train.txt as the dev split "
                             "when there is no dev.txt, e.g. 0.05: the last windows "
                             "with --pack, a seeded sample of lines without.")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the --dev_fraction sample of lines (default 0).")
    parser.add_argument("--quiet", action="store_true",
                        help="No progress bars, only the summary (bars are also off "
                             "when stderr is not a terminal).")
    return parser.parse_args(argv)


def vocab_dir_and_label(pretrain_model_dir):
    """The directory to pass to get_encoder, and a description for the log."""
    if pretrain_model_dir is None:
        # The original's default, when it has been downloaded; else our copy
        # of the same vocabulary, so the toy pipeline runs offline.
        if os.path.isfile(os.path.join(DEFAULT_PRETRAIN_MODEL_DIR, ENCODER_FILE)):
            pretrain_model_dir = DEFAULT_PRETRAIN_MODEL_DIR
        else:
            return None, f"the GPT-2 vocabulary shipped in {SHIPPED_VOCAB_DIR}"
    if is_hub_name(pretrain_model_dir):  # its tokenizer files, not its weights
        pretrain_model_dir = fetch_hub_model(pretrain_model_dir, weights=False)
    if os.path.exists(pretrain_model_dir) and not os.path.isdir(pretrain_model_dir):
        raise UserError(f"--pretrain_model_dir {pretrain_model_dir} is a file: give the "
                        f"model directory that holds {ENCODER_FILE} and vocab.bpe "
                        f"(or a Hugging Face one's vocab.json and merges.txt)")
    if not os.path.isdir(pretrain_model_dir):
        raise UserError(f"--pretrain_model_dir {pretrain_model_dir} does not exist: "
                        f"give a GPT-2 model directory, or leave the flag out to "
                        f"use the shipped vocabulary")
    found = vocab_files(pretrain_model_dir)
    if found:
        names = "/".join(os.path.basename(path) for path in found)
        return pretrain_model_dir, f"the vocabulary in {pretrain_model_dir} ({names})"
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


def check_dev_source(args, splits) -> None:
    check_dev_fraction(args.dev_fraction)
    if args.dev_fraction is None:
        return
    if "dev" in splits:
        raise UserError(f"{args.data_dir} has a dev.txt and --dev_fraction is given: "
                        f"leave the flag out to use dev.txt, or move dev.txt away")
    if "train" not in splits:
        raise UserError(f"--dev_fraction holds out part of train.txt, and "
                        f"{args.data_dir} has none: add train.txt or leave the flag out")


def check_pairs_flags(args, inputs) -> None:
    """source<TAB>target splits: room for a pair; no flag made for plain text."""
    if not any(path.endswith(".tsv") for path in inputs.values()):
        return
    check_pair_seq_length(args.max_seq_length)
    for flag, given in (("--pack", args.pack), ("--dev_fraction", args.dev_fraction)):
        if given not in (None, False):
            raise UserError(f"{flag} applies to .txt splits, and {args.data_dir} holds "
                            f"source<TAB>target pairs: leave it out (write a dev.tsv "
                            f"for a dev split)")


def check_input(path, progress):
    """Check a split's text file in full; its (examples, empty lines)."""
    return check_pairs_file(path) if path.endswith(".tsv") else \
        check_text_file(path, progress)


def check_outputs_not_inputs(args, inputs, output_dir, outputs):
    """No <split>.npy may be a file this run reads (a link onto train.txt, the
    vocabulary): refused before anything is read (utils/output_safety.py).
    Existing .npy files are replaced: they are this script's own output, and
    the documented default (see --output_dir)."""
    read = [(f"the {split} split", path) for split, path in inputs.items()]
    read += [("--pretrain_model_dir", args.pretrain_model_dir),
             ("the default vocabulary", DEFAULT_PRETRAIN_MODEL_DIR),
             ("the shipped vocabulary", SHIPPED_VOCAB_DIR)]
    refuse_outputs_on_inputs([("output", split_data_path(output_dir, split))
                              for split in outputs], read)


def prepare(args) -> int:

    check_max_seq_length(args.max_seq_length)
    check_num_workers(args.num_workers)
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir {args.data_dir} is not a directory")
    inputs = split_files(args.data_dir)
    splits = list(inputs)
    check_pairs_flags(args, inputs)
    check_dev_source(args, splits)
    output_dir = args.data_dir if args.output_dir is None else args.output_dir
    prepare_output_dir(output_dir)  # before hours of encoding, not after
    outputs = splits + (["dev"] if args.dev_fraction is not None else [])
    for split in outputs:
        out_path = split_data_path(output_dir, split)
        if os.path.isdir(out_path):
            raise UserError(f"{out_path} is a directory: move it away, or give "
                            f"another --output_dir")
    check_outputs_not_inputs(args, inputs, output_dir, outputs)
    vocab_dir, vocab_label = vocab_dir_and_label(args.pretrain_model_dir)
    how = "packed into windows" if args.pack else "one example per line"
    print(f"Encoding {', '.join(os.path.basename(p) for p in inputs.values())} from "
          f"{args.data_dir} with {vocab_label}; {how}, max_seq_length "
          f"{args.max_seq_length}.", file=sys.stderr)
    if args.dev_fraction is not None:
        held = "its last windows" if args.pack else f"a sample of its lines (seed {args.seed})"
        print(f"No dev.txt: holding out {args.dev_fraction:g} of train.txt, {held}, "
              f"as the dev split.", file=sys.stderr)

    start = time.time()
    summaries = []
    try:
        # Every split checked before any is written: a bad file changes nothing.
        counts = {split: check_input(inputs[split], not args.quiet) for split in splits}
        for split in splits:
            summaries += prepare_one(args, split, inputs[split], output_dir, vocab_dir,
                                     counts[split])
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as Terminated
        # Splits are written in order, each atomically: name what is done.
        done_names = [s.split for s in summaries]
        done = ", ".join(f"{s}.npy" for s in done_names)
        left = ", ".join(f"{s}.npy" for s in outputs if s not in done_names)
        print(f"interrupted: {left} not written" + (f"; {done} complete" if done else ""),
              file=sys.stderr)
        raise
    for s in summaries:
        print(describe_summary(s, args))
    info = write_data_info(output_dir, args.max_seq_length, args.pack,
                           any(path.endswith(".tsv") for path in inputs.values()),
                           args.data_dir, outputs)
    print(f"Settings recorded in {info} (gpt2_train_main.py reads max_seq_length "
          f"from it).")
    print(f"Done in {time.time() - start:.1f} s.")
    return 0


def prepare_one(args, split, text_path, output_dir, vocab_dir, counts):
    """Encode one text file; the summaries of the files written (two when the
    dev split is held out of it)."""
    out_path = split_data_path(output_dir, split)
    dev_fraction = args.dev_fraction if split == "train" else None
    dev_path = split_data_path(output_dir, "dev")
    common = dict(max_seq_length=args.max_seq_length, vocab_dir=vocab_dir,
                  progress=not args.quiet)
    if args.pack:
        return pack_split(text_path, out_path, dev_fraction=dev_fraction,
                          dev_path=dev_path,
                          num_workers=args.num_workers or default_num_workers(), **common)
    if dev_fraction is None:
        return [prepare_split(text_path, out_path, num_workers=args.num_workers,
                              counts=counts, **common)]
    return hold_out_lines(text_path, out_path, dev_path, dev_fraction, args.seed,
                          num_workers=args.num_workers, counts=counts, **common)


def describe_summary(s, args) -> str:
    """One line of the final summary for a prepared split."""
    if args.pack:
        return (f"{s.split}: {s.examples:,} windows of up to {args.max_seq_length} "
                f"tokens, {s.tokens:,} tokens -> {s.path}")
    line = f"{s.split}: {s.examples:,} examples, {s.tokens:,} tokens (longest {s.longest}), "
    cuts = getattr(s, "pair_cuts", None)
    if cuts is None:
        line += f"{s.truncated:,} truncated to {args.max_seq_length}, "
    else:
        line += f"{cuts.sources:,} sources cut from the start to fit {args.max_seq_length}, "
        if cuts.targets:
            line += (f"{cuts.targets:,} targets too long to fit whole (first at line "
                     f"{cuts.first_target_line}: kept their start, unclosed; raise "
                     f"--max_seq_length or shorten them), ")
    return line + f"{s.skipped:,} empty lines skipped -> {s.path}"


if __name__ == "__main__":
    run_main(main)
