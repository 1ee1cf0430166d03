"""--do_test: continue every test line and write <output_dir>/test_samples.tsv.

Each line of the file is context<TAB>continuation, in the test split's order;
the context is the whole test line. Line breaks and tabs inside either field
become spaces, so every reader sees one line per example and exactly one tab.
"""
import re

import torch

from utils.atomic import atomic_write
from utils.flags import SamplingSettings

TEST_SAMPLES = "test_samples.tsv"
# Characters that end a line for some reader (str.splitlines counts all of
# these), and the tab: replaced by a space inside TSV fields.
_TSV_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def tsv_field(text: str) -> str:
    """`text` on one line without tabs, so a TSV line has exactly one tab."""
    return _TSV_BREAKS.sub(" ", text)


def check_test_lengths(split, args, cfg, n_ctx: int) -> SamplingSettings:
    """The test step's sampling settings (--config_train's defaults filled in),
    checked against the model and the longest test line (before training, so
    a bad value does not waste a run)."""
    settings = args.sampling.replace(
        max_decoding_length=args.max_decoding_length or cfg.max_decoding_length,
        seed=args.seed if args.seed is not None else cfg.seed,
        batch_size=cfg.test_batch_size,
        length_setting=f"--max_decoding_length (or max_decoding_length in {cfg.name})")
    # A context is a line's tokens without the closing <|endoftext|>.
    settings.check(n_ctx, int(split.lengths.max()) - 1)
    return settings


def write_test_samples(model, split, encoder, args, cfg, device, n_ctx: int,
                       path: str, progress: bool) -> int:
    """Continue each test example and write context<TAB>continuation lines."""
    from tqdm import tqdm
    from utils.generation import generate
    from utils.processor import EOS_ID

    settings = check_test_lengths(split, args, cfg, n_ctx)
    # The context is the whole line: <|endoftext|> + BPE(line), without the
    # closing <|endoftext|> that prepare_data.py added.
    contexts = [split.example(i)[:-1] for i in range(len(split))]
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
    lines = [f"{tsv_field(encoder.decode(context[1:]))}\t{tsv_field(encoder.decode(ids))}\n"
             for context, ids in zip(contexts, continuations)]
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)
    return len(lines)
