"""--do_test: continue every test line and write <output_dir>/test_samples.tsv.

Each line of the file is context<TAB>continuation, in the test split's order;
the context is the whole test line. For conditional data (test.tsv, see
utils/data/pairs.py) the model continues <|endoftext|> source <|endoftext|> and the
line is source<TAB>generated target, with the reference target as a third
column when the test line has one. Line breaks and tabs inside a field become
spaces, so every reader sees one line per example and one tab between fields.
"""
import re

import torch
from tqdm import tqdm

from utils.atomic import atomic_write
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


def write_test_samples(model, split, encoder, settings: SamplingSettings, cfg, device,
                       path: str, progress: bool) -> int:
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
    if split.conditional:
        lines = [pair_line(encoder, example, len(context), ids) for example, context, ids
                 in zip(examples, contexts, continuations)]
    else:
        lines = [f"{tsv_field(encoder.decode(context[1:]))}\t"
                 f"{tsv_field(encoder.decode(ids))}\n"
                 for context, ids in zip(contexts, continuations)]
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)


def pair_line(encoder, example, context_length: int, generated) -> str:
    """source<TAB>generated target[<TAB>reference target] of one test pair."""
    fields = [example[1:context_length - 1], generated]
    reference = example[context_length:]
    if reference and reference[-1] == EOS_ID:
        reference = reference[:-1]  # the closing <|endoftext|>
    if reference:
        fields.append(reference)
    return "\t".join(tsv_field(encoder.decode(ids)) for ids in fields) + "\n"
