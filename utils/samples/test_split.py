"""--do_test: continue every test line and write <output_dir>/test_samples.tsv.

Each line of the file is context<TAB>continuation, in the test split's order;
the context is the whole test line. For conditional data (test.tsv, see
utils/data/pairs.py) the model continues <|endoftext|> source <|endoftext|> and the
line is source<TAB>generated target, with the reference target as a third
column when the test line has one. The source column is the source as the
user wrote it in test.tsv (read again from the directory prepared.json
names), even when the model saw only its end: a cut is reported in the log. Line breaks and tabs inside a field become
spaces, so every reader sees one line per example and one tab between fields.
"""
import os
import re
from typing import List, NamedTuple, Optional

import torch
from tqdm import tqdm

from utils.atomic import atomic_write
from utils.data.data_info import read_data_info
from utils.data.pairs import iter_pairs
from utils.data.records import split_pairs_path
from utils.errors import UserError
from utils.decoding.settings import SamplingSettings
from utils.decoding.generation import generate
from utils.processor import EOS_ID

TEST_SAMPLES = "test_samples.tsv"
# Characters that end a line for some reader (str.splitlines counts all of
# these), and the tab: replaced by a space inside TSV fields.
_TSV_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def tsv_field(text: str) -> str:
    """`text` on one line without tabs, so a TSV line has exactly one tab."""
    return _TSV_BREAKS.sub(" ", text)


def sampling_for_test_split(split, flags: SamplingSettings, cfg, n_ctx: int) -> SamplingSettings:
    """The test step's sampling settings: the flags' (`flags`), with
    --config_train's length and seed where the flags leave them out, checked
    against the model and the longest test line (before training, so a bad
    value does not waste a run)."""
    settings = flags.replace(
        max_decoding_length=flags.max_decoding_length or cfg.max_decoding_length,
        seed=flags.seed if flags.seed is not None else cfg.seed,
        batch_size=cfg.test_batch_size,
        length_setting=f"--max_decoding_length (or max_decoding_length in {cfg.name})")
    settings.check_lengths(n_ctx, int(split.context_lengths.max()))
    return settings


class SamplesWritten(NamedTuple):
    lines: int
    notes: List[str]  # for the log: cut sources, or why they could not be shown whole


def write_test_samples(model, split, encoder, settings: SamplingSettings, cfg, device,
                       path: str, progress: bool) -> SamplesWritten:
    """Continue each test example with `settings` (from `sampling_for_test_split`) and
    write context<TAB>continuation lines."""
    # Plain text: the whole line, <|endoftext|> + BPE(line), without the
    # closing <|endoftext|>; pairs: <|endoftext|> source <|endoftext|>.
    examples = [split.example(i) for i in range(len(split))]
    contexts = [ids[:n] for ids, n in zip(examples, split.context_lengths.tolist())]
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed)
    model.eval()
    continuations = [None] * len(contexts)
    for indices in tqdm(split.batches_by_length(cfg.test_batch_size), desc="test",
                        unit="batch", disable=None if progress else True):
        outputs = generate(model, [contexts[i] for i in indices],
                           settings.max_decoding_length, **settings.generate_kwargs(),
                           end_token=EOS_ID, generator=generator)
        for i, ids in zip(indices, outputs):
            continuations[i] = ids
    notes = []
    if split.conditional:
        sources = given_sources(cfg.data_dir, examples, contexts, encoder, notes)
        lines = [pair_line(encoder, example, len(context), ids, source)
                 for example, context, ids, source
                 in zip(examples, contexts, continuations, sources)]
    else:
        lines = [f"{tsv_field(encoder.decode(context[1:]))}\t"
                 f"{tsv_field(encoder.decode(ids))}\n"
                 for context, ids in zip(contexts, continuations)]
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return SamplesWritten(len(lines), notes)


def given_sources(data_dir: str, examples, contexts, encoder,
                  notes: List[str]) -> List[Optional[str]]:
    """Each test pair's source as test.tsv gives it, or None (then the TSV
    shows the part the model saw) when the file is gone or no longer matches
    the prepared split; `notes` gets what the log should say."""
    info = read_data_info(data_dir)
    unknown = [None] * len(examples)
    if info is None:
        notes.append(f"{data_dir} has no prepared.json (prepared by an older "
                     f"version): the source column shows what the model saw")
        return unknown
    path = split_pairs_path(info.text_dir, "test")
    try:
        pairs = list(iter_pairs(path)) if os.path.isfile(path) else None
    except UserError:
        pairs = None
    seen = [context[1:-1] for context in contexts]  # between the <|endoftext|>s
    if pairs is None or len(pairs) != len(examples):
        notes.append(f"{path} is gone or changed since it was prepared: the source "
                     f"column shows what the model saw")
        return unknown
    sources, cut = [], 0
    for (_, source, _), ids in zip(pairs, seen):
        full = encoder.encode(source)
        if full[len(full) - len(ids):] != list(ids):
            notes.append(f"{path} changed since it was prepared: the source column "
                         f"shows what the model saw")
            return unknown
        cut += len(full) > len(ids)
        sources.append(source)
    if cut:
        notes.append(f"{cut} of {len(examples)} test sources did not fit in "
                     f"max_seq_length {info.max_seq_length} beside their target: the "
                     f"model saw only their end; {TEST_SAMPLES} shows them whole")
    return sources


def pair_line(encoder, example, context_length: int, generated,
              source: Optional[str] = None) -> str:
    """source<TAB>generated target[<TAB>reference target] of one test pair;
    `source`: the text as given (default: the part of it the record holds)."""
    fields = [source if source is not None else encoder.decode(example[1:context_length - 1]),
              encoder.decode(generated)]
    reference = example[context_length:]
    if reference and reference[-1] == EOS_ID:
        reference = reference[:-1]  # the closing <|endoftext|>
    if reference:
        fields.append(encoder.decode(reference))
    return "\t".join(tsv_field(text) for text in fields) + "\n"
