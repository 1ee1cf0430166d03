"""Generate text with GPT-2: continue prompts interactively, or sample from scratch.

Interactive:      python gpt2_generate_main.py --is_interactive --top_k 40
From scratch:     python gpt2_generate_main.py --nsamples 4 --batch_size 2
Fine-tuned model: python gpt2_generate_main.py --checkpoint output/model.ckpt
Fine-tuned on source<TAB>target pairs:
                  python gpt2_generate_main.py --is_interactive --conditional \
                      --checkpoint output/model.ckpt

Weights come from --checkpoint (written by gpt2_train_main.py) when given,
otherwise from OpenAI's checkpoint in --pretrain_model_dir (downloaded there on
first use). Runs on CUDA when present, CPU otherwise.
"""
import argparse
import sys

import torch

from utils.errors import UserError, run_main
from utils.flags import (GENERATION_MEMORY_FIX, MAX_SEED, SamplingSettings,
                         add_sampling_args, add_weight_args, check_batching,
                         check_context_room, weight_flags)

BANNER_WIDTH = 40
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--is_interactive", action="store_true",
                        help="Prompt for contexts and continue each one.")
    parser.add_argument("--conditional", action="store_true",
                        help="For a model fine-tuned on source<TAB>target pairs: "
                             "each prompt is a source, framed as <|endoftext|> "
                             "source <|endoftext|>, and the sample is its target.")
    add_sampling_args(parser, max_decoding_length_default=128,
                      max_decoding_length_help="Most tokens in a sample, the context "
                      "included (at most the model's positions, 1024 for GPT-2).")
    parser.add_argument("--nsamples", type=int, default=1,
                        help="Samples per prompt (interactive) or in total.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Samples generated together; must divide --nsamples.")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"Random seed, 0 to {MAX_SEED}: the same seed gives the "
                             f"same samples.")
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


def check_args(args) -> SamplingSettings:
    """Reject flag values that cannot work, before a model is loaded."""
    check_batching(args.nsamples, args.batch_size)
    if args.conditional and not args.is_interactive:
        raise UserError("--conditional continues sources you type: add "
                        "--is_interactive (without prompts there is no source)")
    return SamplingSettings.from_flags(args, batch_size=args.batch_size,
                                       dtype=args.dtype)


class SampleWriter:
    """Generates and prints samples for one session: model, encoder, settings."""

    def __init__(self, model, encoder, settings: SamplingSettings, nsamples: int,
                 device):
        from utils.processor import EOS_ID
        self.model, self.encoder, self.settings = model, encoder, settings
        self.nsamples = nsamples
        self.end_token = EOS_ID
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(settings.seed if settings.seed is not None
                             else torch.seed())

    def samples(self, context, on_tokens=None):
        """Continuation ids for `batch_size` copies of one context."""
        from utils.generation import generate, out_of_memory_as_user_error
        s = self.settings
        with out_of_memory_as_user_error(
                f"generating {s.batch_size} sample(s) of up to "
                f"{s.max_decoding_length} tokens", GENERATION_MEMORY_FIX):
            return generate(self.model, [context] * s.batch_size,
                            s.max_decoding_length, **s.generate_kwargs(),
                            end_token=self.end_token, generator=self.rng,
                            on_tokens=on_tokens)

    def print_batches(self, context, stream: bool) -> None:
        """Print --nsamples samples for `context`, each under a SAMPLE banner."""
        from utils.interactive import StreamPrinter
        count = 0
        for _ in range(self.nsamples // self.settings.batch_size):
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


def prompt_context(writer: SampleWriter, raw_text: str, conditional: bool):
    """The token ids a prompt is continued from (see --conditional)."""
    if conditional:
        from utils.pairs import source_context
        return source_context(raw_text.strip(), writer.encoder.encode, writer.end_token)
    return writer.encoder.encode(raw_text)


def interactive_loop(writer: SampleWriter, conditional: bool = False) -> None:
    """Read prompts until EOF or Ctrl-C; continue each one."""
    from utils.interactive import NotUTF8, read_prompt
    settings = writer.settings
    stream = settings.batch_size == 1 and settings.strategy != "beam"
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
        try:
            context = prompt_context(writer, raw_text, conditional)
            check_context_room("the prompt is", len(context),
                               settings.max_decoding_length,
                               "shorten it or raise --max_decoding_length")
            writer.print_batches(context, stream)
        except UserError as err:  # e.g. a prompt longer than the model allows
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from utils.generation import out_of_memory_as_user_error
    from utils.model import default_device
    from utils.processor import get_encoder
    from utils.weights import load_weights, resolve_model

    settings = check_args(args)  # before loading, and maybe downloading, a model
    device = default_device()
    if (args.dtype == "bfloat16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported()):
        raise UserError("this GPU has no bfloat16 support: use --dtype float16")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    resolved = resolve_model(**weight_flags(args))
    # An interactive prompt may fill all but one position.
    longest = settings.max_decoding_length - 1 if args.is_interactive else 1
    # Before the weights are read or downloaded.
    settings.check(resolved.sizes["n_ctx"], longest, sizes=resolved.sizes,
                   device=device, model=resolved.describe())
    loaded = load_weights(resolved)
    encoder = get_encoder(loaded.vocab_dir)
    with out_of_memory_as_user_error(f"moving the model to {device}",
                                     "use --dtype bfloat16 or a smaller model"):
        model = loaded.model.to(device=device, dtype=getattr(torch, args.dtype))
    print(f"Loaded {loaded.source} on {device} ({args.dtype}).", file=sys.stderr)

    writer = SampleWriter(model, encoder, settings, args.nsamples, device)
    if args.is_interactive:
        interactive_loop(writer, args.conditional)
    else:
        writer.print_batches([writer.end_token], stream=False)
    return 0


if __name__ == "__main__":
    run_main(main)
