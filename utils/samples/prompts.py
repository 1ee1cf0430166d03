"""Prompts from the command line or a file, continued in shared batches (gpt2_generate_main.py).

`read_prompts` takes --prompt texts and the lines of --prompt_file (`-` reads
standard input; blank lines are skipped; a line that is not UTF-8 is an error
naming it). `continue_prompts` generates --nsamples continuations of every
prompt: the rows (prompt, sample) are taken in order, --batch_size at a time,
so rows of different prompts share a batch (the engine left-pads them; each
row decodes as it would alone).
"""
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch

from tqdm import tqdm

from utils.errors import UserError
from utils.decoding.limits import check_context_room
from utils.decoding.limits import GENERATION_MEMORY_FIX
from utils.decoding.generation import generate
from utils.decoding.limits import out_of_memory_as_user_error
from utils.samples.output import open_output
from utils.decoding.stop_text import StopTexts
from utils.decoding.stop_text import cut_at_stop
from utils.input_files import read_regular_file, read_stdin

# Far more prompts than a run can continue (each one fits in 1024 tokens).
MAX_PROMPT_FILE_BYTES = 256 << 20


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str    # for messages: "--prompt 1", "line 3 of prompts.txt"


def read_prompts(texts: Sequence[str], prompt_file: Optional[str]) -> List[Prompt]:
    prompts = [Prompt(text, f"--prompt {i + 1}") for i, text in enumerate(texts)
               if _utf8_prompt(i, text) and (text.strip() or _empty_prompt(i))]
    if prompt_file is not None:
        prompts += _file_prompts(prompt_file)
    return prompts


def _utf8_prompt(index: int, text: str) -> bool:
    """A command-line argument's bytes that are not UTF-8 reach Python as lone
    surrogates (U+DC80-U+DCFF stand for the bytes 0x80-0xFF): name the flag."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else \
            f"U+{char:04X}"
        raise UserError(f"--prompt {index + 1} is not valid UTF-8 ({byte} at character "
                        f"{err.start + 1}): pass the text in UTF-8 (check the "
                        f"terminal's or the script's encoding)") from None
    return True


def _empty_prompt(index: int) -> bool:
    raise UserError(f"--prompt {index + 1} is empty: give the text to continue")


def _file_prompts(path: str) -> List[Prompt]:
    name = "standard input" if path == "-" else path
    # Bounded, and never blocking on a FIFO without a writer (utils/input_files.py).
    data = (read_stdin("--prompt_file -", MAX_PROMPT_FILE_BYTES) if path == "-" else
            read_regular_file(path, f"--prompt_file {path}", MAX_PROMPT_FILE_BYTES,
                              instead=" (or - to read standard input)"))
    prompts = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"line {number} of {name} is not valid UTF-8 (byte "
                            f"0x{raw[err.start]:02x}): convert the file to UTF-8") from None
        line = line.rstrip("\r")
        if line.strip():
            prompts.append(Prompt(line, f"line {number} of {name}"))
    if not prompts:
        raise UserError(f"{name} holds no prompts: put one prompt on each line")
    return prompts


def encode_prompts(prompts: Sequence[Prompt], encoder, max_decoding_length: int
                   ) -> List[List[int]]:
    """Token ids of each prompt; one too long for max_decoding_length is an error."""
    contexts = []
    for prompt in prompts:
        ids = encoder.encode(prompt.text)
        check_context_room(f"the prompt on {prompt.where} is", len(ids),
                           max_decoding_length,
                           "shorten it or raise --max_decoding_length (at most the "
                           "model's positions)")
        contexts.append(ids)
    return contexts


def continue_prompts(model, contexts: Sequence[List[int]], nsamples: int, settings,
                     *, end_token: int, generator: torch.Generator,
                     stop_factory=None, repetition_penalty: float = 1.0
                     ) -> Iterator[tuple]:
    """(prompt index, sample number from 1, continuation ids) for every row,
    in order. `stop_factory(rows)` makes a batch's stop_check."""
    rows = [(p, n) for p in range(len(contexts)) for n in range(1, nsamples + 1)]
    size = settings.batch_size
    for start in range(0, len(rows), size):
        batch = rows[start:start + size]
        with out_of_memory_as_user_error(
                f"generating {len(batch)} sample(s) of up to "
                f"{settings.max_decoding_length} tokens", GENERATION_MEMORY_FIX):
            outputs = generate(
                model, [contexts[p] for p, _ in batch], settings.max_decoding_length,
                **settings.generate_kwargs(), end_token=end_token, generator=generator,
                repetition_penalty=repetition_penalty,
                stop_check=stop_factory(len(batch)) if stop_factory else None)
        for (p, n), ids in zip(batch, outputs):
            yield p, n, ids


def write_samples(model, encoder, settings, prompts: Sequence[Prompt],
                  contexts: Sequence[List[int]], *, nsamples: int, output_file,
                  stop_texts: Sequence[str], repetition_penalty: float,
                  generator: torch.Generator, end_token: int,
                  overwrite: bool = False) -> int:
    """Continue every prompt `nsamples` times into --output_file (or the
    screen); a progress bar on the terminal for a file of several prompts.
    Returns the samples written."""
    stop_factory = ((lambda rows: StopTexts(encoder, stop_texts, rows))
                    if stop_texts else None)
    rows = continue_prompts(model, contexts, nsamples, settings, end_token=end_token,
                            generator=generator, stop_factory=stop_factory,
                            repetition_penalty=repetition_penalty)
    show_bar = output_file is not None and len(prompts) > 1
    written = 0
    with open_output(output_file, overwrite) as sink, tqdm(
            total=len(contexts) * nsamples, unit=" samples", desc="generate",
            disable=None if show_bar else True) as bar:
        for p, n, ids in rows:
            sink.sample(prompts[p].text, n, cut_at_stop(encoder.decode(ids), stop_texts))
            if n == nsamples:
                sink.end_of_prompt()
            bar.update(1)
            written += 1
    return written
