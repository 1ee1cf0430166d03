"""Generate text with GPT-2: continue prompts interactively, or sample from scratch.

Interactive:      python gpt2_generate_main.py --is_interactive --top_k 40
From scratch:     python gpt2_generate_main.py --nsamples 4 --batch_size 2
Fine-tuned model: python gpt2_generate_main.py --checkpoint output/model.ckpt

Weights come from --checkpoint (written by gpt2_train_main.py) when given,
otherwise from OpenAI's checkpoint in --pretrain_model_dir (downloaded there on
first use). Runs on CUDA when present, CPU otherwise.
"""
import argparse
import sys

import torch

from utils.cli_args import (MAX_ROWS, add_sampling_args, add_weight_args,
                            check_sampling_args)
from utils.errors import UserError, run_main

BANNER_WIDTH = 40
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUT_OF_MEMORY_FIX = ("use a smaller --batch_size, --beam_width or "
                     "--max_decoding_length, or --dtype bfloat16")
PROMPT = "Model input >>> "


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--is_interactive", action="store_true",
                        help="Prompt for contexts and continue each one.")
    add_sampling_args(parser, max_decoding_length_default=128,
                      max_decoding_length_help="Most tokens in a sample, the context "
                      "included (at most the model's positions, 1024 for GPT-2).")
    parser.add_argument("--nsamples", type=int, default=1,
                        help="Samples per prompt (interactive) or in total.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Samples generated together; must divide --nsamples.")
    parser.add_argument("--seed", type=int, default=None,
                        help="Random seed: the same seed gives the same samples.")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="Precision of the weights while generating. bfloat16 "
                             "and float16 halve the memory and, as decoding is "
                             "bound by reading the weights, run faster; samples "
                             "differ slightly from float32's.")
    add_weight_args(
        parser,
        config_model_help="Model config module or .py path (default: the "
                          "checkpoint's hparams.json).",
        checkpoint_help="A model saved by gpt2_train_main.py; takes precedence "
                        "over --pretrain_checkpoint.")
    return parser.parse_args(argv)


def check_args(args) -> None:
    """Reject flag values that cannot work, before a model is loaded."""
    check_sampling_args(args)
    if args.nsamples < 1 or args.batch_size < 1:
        raise UserError("--nsamples and --batch_size must be at least 1")
    if args.batch_size > MAX_ROWS:
        raise UserError(f"--batch_size must be at most {MAX_ROWS} "
                        f"(got {args.batch_size})")
    if args.nsamples % args.batch_size:
        raise UserError(f"--nsamples ({args.nsamples}) must be divisible by "
                        f"--batch_size ({args.batch_size})")


def check_max_decoding_length(args, n_ctx: int) -> None:
    """The sample length, context included, must fit the model's positions."""
    if not 2 <= args.max_decoding_length <= n_ctx:
        raise UserError(f"--max_decoding_length must be between 2 and the model's "
                        f"{n_ctx} positions (got {args.max_decoding_length})")


def check_fits(args, sizes, device) -> None:
    """Refuse a length, batch or beam the model or the memory cannot hold.

    Runs once the model's sizes are known, before its weights are read or
    downloaded. An interactive prompt may fill all but one position.
    """
    from utils.generation import require_generation_memory
    check_max_decoding_length(args, sizes["n_ctx"])
    prompt_length = args.max_decoding_length - 1 if args.is_interactive else 1
    require_generation_memory(
        sizes, batch_size=args.batch_size,
        max_decoding_length=args.max_decoding_length, prompt_length=prompt_length,
        strategy=args.decoding_strategy, beam_width=args.beam_width,
        dtype=DTYPES[args.dtype], device=device, fix=OUT_OF_MEMORY_FIX)


class StreamPrinter:
    """Prints one row's tokens as they are made, whole characters at a time.

    A BPE token can end in the middle of a UTF-8 character, so the text is
    re-decoded from all ids so far and only the settled part is printed.
    """

    def __init__(self, encoder, end_token: int, out=None):
        self.encoder, self.end_token = encoder, end_token
        self.out = out or sys.stdout
        self.ids, self.printed, self.finished = [], "", False

    def __call__(self, new_ids: torch.Tensor, done: torch.Tensor) -> None:
        if self.finished:
            return
        token = int(new_ids[0])
        if token == self.end_token:
            self.finished = True
            return
        self.ids.append(token)
        text = self.encoder.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)
        self.finished = bool(done[0])

    def close(self) -> None:
        self._emit(self.encoder.decode(self.ids))

    def _emit(self, text: str) -> None:
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


class Generator:
    """Holds the model, the encoder and the sampling settings for the session."""

    def __init__(self, args, model, encoder, device):
        from utils.processor import EOS_ID
        self.args, self.model, self.encoder = args, model, encoder
        self.end_token = EOS_ID
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(args.seed if args.seed is not None
                             else torch.seed())

    def samples(self, context, on_tokens=None):
        """Continuation ids for `batch_size` copies of one context."""
        from utils.generation import generate, out_of_memory_as_user_error
        a = self.args
        with out_of_memory_as_user_error(
                f"generating {a.batch_size} sample(s) of up to "
                f"{a.max_decoding_length} tokens", OUT_OF_MEMORY_FIX):
            return generate(self.model, [context] * a.batch_size,
                            a.max_decoding_length, strategy=a.decoding_strategy,
                            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            beam_width=a.beam_width, length_penalty=a.length_penalty,
                            end_token=self.end_token, generator=self.rng,
                            on_tokens=on_tokens)

    def print_batches(self, context, stream: bool) -> None:
        """Print --nsamples samples for `context`, each under a SAMPLE banner."""
        count = 0
        for _ in range(self.args.nsamples // self.args.batch_size):
            if stream:
                count += 1
                print_banner(count)
                printer = StreamPrinter(self.encoder, self.end_token)
                self.samples(context, on_tokens=printer)
                printer.close()
                print()
                continue
            for ids in self.samples(context):
                count += 1
                print_banner(count)
                print(self.encoder.decode(ids))
        print("=" * (2 * BANNER_WIDTH))
        sys.stdout.flush()


def print_banner(number: int) -> None:
    bar = "=" * BANNER_WIDTH
    print(f"{bar} SAMPLE {number} {bar}")


class NotUTF8(ValueError):
    """A line of input that is not valid UTF-8 text."""


def read_prompt() -> str:
    """Print the prompt and read one line of stdin, without its line ending.

    Reads bytes and decodes each line alone, so a line that is not UTF-8 is
    reported (NotUTF8) and the lines after it are still read (input() would
    lose them: its decoder fails on a whole buffered chunk). Raises EOFError
    at the end.
    """
    sys.stdout.write(PROMPT)
    sys.stdout.flush()
    if sys.stdin is None:  # started with stdin closed
        raise EOFError
    line = getattr(sys.stdin, "buffer", sys.stdin).readline()
    if not line:
        raise EOFError
    try:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        else:  # a text stream; undecodable bytes show up as lone surrogates
            line.encode("utf-8")
    except UnicodeError:
        raise NotUTF8() from None
    return line.rstrip("\r\n")


def interactive_loop(generator: Generator, encoder) -> None:
    """Read prompts until EOF or Ctrl-C; continue each one."""
    stream = (generator.args.batch_size == 1
              and generator.args.decoding_strategy != "beam")
    while True:
        try:
            raw_text = read_prompt()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        except NotUTF8:
            print("error: that input is not valid UTF-8 text: type or paste the "
                  "prompt again as UTF-8", file=sys.stderr)
            continue
        if not raw_text.strip():
            print("Prompt should not be empty!")
            continue
        context = encoder.encode(raw_text)
        limit = generator.args.max_decoding_length
        if len(context) >= limit:
            print(f"error: the prompt is {len(context)} tokens, leaving no room "
                  f"within --max_decoding_length {limit} (which counts the prompt): "
                  f"shorten it or raise --max_decoding_length", file=sys.stderr)
            continue
        try:
            generator.print_batches(context, stream)
        except UserError as err:  # e.g. a prompt longer than the model allows
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from utils.checkpoint import load_model
    from utils.generation import out_of_memory_as_user_error
    from utils.model import default_device, model_size
    from utils.processor import get_encoder

    check_args(args)  # before loading, and maybe downloading, a model
    device = default_device()
    if (args.dtype == "bfloat16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise UserError("this GPU has no bfloat16 support: use --dtype float16")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    loaded = load_model(config_model=args.config_model,
                        pretrain_model_dir=args.pretrain_model_dir,
                        pretrain_checkpoint=args.pretrain_checkpoint,
                        checkpoint=args.checkpoint,
                        check=lambda hparams: check_fits(
                            args, model_size(hparams), device))
    encoder = get_encoder(loaded.vocab_dir)
    with out_of_memory_as_user_error(f"moving the model to {device}",
                                     "use --dtype bfloat16 or a smaller model"):
        model = loaded.model.to(device=device, dtype=DTYPES[args.dtype])
    print(f"Loaded {loaded.source} on {device} ({args.dtype}).", file=sys.stderr)

    generator = Generator(args, model, encoder, device)
    if args.is_interactive:
        interactive_loop(generator, encoder)
    else:
        generator.print_batches([generator.end_token], stream=False)
    return 0


if __name__ == "__main__":
    run_main(main)
