"""Conditional data: `source<TAB>target` lines -> records that know where the source ends.

A split's `<split>.tsv` holds one pair per line: the source (a question, an
article, a prompt), a tab, the target (its answer, summary, reply). Lines end
as in utils/data/text_lines.py, surrounding whitespace is stripped from the line
and from each field, and empty lines are skipped. `test.tsv` may leave out the
target (a line of source alone): the target, when given, is the reference
that --do_test writes beside the generated one.

Each pair becomes (utils/data/records.py's conditional records)

    <|endoftext|> + BPE(source) + <|endoftext|> + BPE(target) + <|endoftext|>

with `context_length` = BPE(source) + 2, so that the loss counts only the
target and its closing <|endoftext|>.

Truncation, when a pair is longer than max_seq_length: the target is what
the model learns to write, so it is kept whole and the source loses tokens
from its start (its end, nearest the target, is usually what matters most).
A target too long to fit even beside one source token keeps its first
max_seq_length - 3 tokens and no closing <|endoftext|> (the model must not
learn to stop where the cut fell); those pairs are counted and the first one's
line named in the summary.
"""
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from utils.data.records import CONTEXT_FIELD, IDS_FIELD, LENGTH_FIELD
from utils.errors import UserError
from utils.data.text_lines import iter_lines

# Lines are read whole (a pair's source is cut from its start, so its end is
# needed); a line longer than this is refused rather than held in memory.
MAX_PAIR_LINE_CHARS = 1 << 24
# One source token, one target token and the three <|endoftext|>.
MIN_PAIR_SEQ_LENGTH = 5


def reference_optional(path: str) -> bool:
    """Only test.tsv may hold sources without a target."""
    return os.path.basename(path) == "test.tsv"


def check_pair_seq_length(max_seq_length: int) -> None:
    if max_seq_length < MIN_PAIR_SEQ_LENGTH:
        raise UserError(f"--max_seq_length must be at least {MIN_PAIR_SEQ_LENGTH} for "
                        f"source<TAB>target data (got {max_seq_length}): a pair needs "
                        f"three <|endoftext|> and a token of each side")


def parse_pair(text: str, path: str, number: int,
               target_optional: bool) -> Tuple[str, str]:
    """(source, target) of one stripped, non-empty line; target "" when absent."""
    fields = text.split("\t")
    if len(fields) == 1 and target_optional:
        return text, ""
    if len(fields) > 2:
        raise UserError(f"{path} line {number} has {len(fields) - 1} tabs: write "
                        f"source<TAB>target with exactly one tab (replace the tabs "
                        f"inside the text with spaces)")
    source, target = (field.strip() for field in fields) if len(fields) == 2 else ("", "")
    if not source or not (target or target_optional):
        raise UserError(f"{path} line {number} is not a source<TAB>target pair: it "
                        f"needs one tab with non-empty text on both sides")
    return source, target


def _parsed_lines(path: str) -> Iterator[Tuple[int, Optional[Tuple[str, str]]]]:
    """(line number, (source, target), or None for an empty line) of a .tsv split."""
    optional = reference_optional(path)
    for number, text, complete in iter_lines(path, MAX_PAIR_LINE_CHARS):
        if not complete:
            raise UserError(f"{path} line {number} is longer than "
                            f"{MAX_PAIR_LINE_CHARS:,} characters: shorten its source "
                            f"(only its end fits in a training example anyway)")
        yield number, (parse_pair(text, path, number, optional) if text else None)


def iter_pairs(path: str) -> Iterator[Tuple[int, str, str]]:
    """(line number, source, target) for each non-empty line of a .tsv split."""
    for number, pair in _parsed_lines(path):
        if pair is not None:
            yield (number, *pair)


def check_pairs_file(path: str) -> Tuple[int, int]:
    """Check every line of a .tsv split; its (pairs, empty lines).

    A full pass before anything is written, so a bad line changes nothing.
    """
    pairs = empty = 0
    for _, pair in _parsed_lines(path):
        if pair is None:
            empty += 1
        else:
            pairs += 1
    if pairs == 0:
        split = os.path.splitext(os.path.basename(path))[0]
        raise UserError(f"{path} has no source<TAB>target lines: put one pair per "
                        f"line (or remove the file to skip the {split} split)")
    return pairs, empty


@dataclass
class PairCuts:
    """What truncation did to a chunk (or a split) of pairs."""
    sources: int = 0                      # pairs whose source lost its start
    targets: int = 0                      # pairs whose target could not fit
    first_target_line: Optional[int] = None

    def add(self, other: "PairCuts") -> None:
        self.sources += other.sources
        self.targets += other.targets
        if self.first_target_line is None:
            self.first_target_line = other.first_target_line


def fit_pair(source: List[int], target: List[int],
             max_seq_length: int) -> Tuple[List[int], List[int], bool]:
    """(source, target, closed) cut to fit; closed: the target keeps its <|endoftext|>.

    The whole target and as much of the source's end as fits; a target that
    cannot fit beside one source token is cut to its start, unclosed.
    """
    room = max_seq_length - 3  # three <|endoftext|>
    if len(target) > room - 1:
        return source[-1:], target[:room], False
    if len(source) + len(target) > room:
        source = source[len(source) + len(target) - room:]
    return source, target, True


def pack_pair_records(pairs: Sequence[Tuple[int, List[int], List[int]]],
                      max_seq_length: int, dtype: np.dtype,
                      eos_id: int) -> Tuple[np.ndarray, PairCuts]:
    """Records for (line number, source ids, target ids) triples, and the cuts."""
    records = np.zeros(len(pairs), dtype=dtype)
    ids = records[IDS_FIELD]
    ids.fill(eos_id)  # the padding and the <|endoftext|> around each part
    cuts = PairCuts()
    for row, (number, source, target) in enumerate(pairs):
        kept_source, kept_target, closed = fit_pair(source, target, max_seq_length)
        if not closed:
            cuts.targets += 1
            if cuts.first_target_line is None:
                cuts.first_target_line = number
        elif len(kept_source) < len(source):
            cuts.sources += 1
        context = len(kept_source) + 2
        ids[row, 1:context - 1] = kept_source
        ids[row, context:context + len(kept_target)] = kept_target
        # An absent target (a test source alone) has no closing token either.
        records[LENGTH_FIELD][row] = context + len(kept_target) + (closed and bool(target))
        records[CONTEXT_FIELD][row] = context
    return records, cuts


def source_context(source: str, encode, eos_id: int) -> List[int]:
    """What a model fine-tuned on pairs continues: <|endoftext|> source <|endoftext|>."""
    return [eos_id] + encode(source) + [eos_id]


def encode_pairs(pairs: Sequence[Tuple[int, str, str]],
                 encode) -> List[Tuple[int, List[int], List[int]]]:
    """BPE both sides of each (line number, source, target)."""
    return [(number, encode(source), encode(target) if target else [])
            for number, source, target in pairs]
