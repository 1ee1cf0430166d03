r"""Generate text with GPT-2: continue prompts interactively, or sample from scratch.

Interactive:      python gpt2_generate_main.py --is_interactive --top_k 40
From scratch:     python gpt2_generate_main.py --nsamples 4 --batch_size 2
Fine-tuned model: python gpt2_generate_main.py --checkpoint output/model.ckpt
Prompts to JSONL: python gpt2_generate_main.py --prompt_file prompts.txt \
                      --nsamples 3 --batch_size 8 --output_file samples.jsonl
Fine-tuned on source<TAB>target pairs:
                  python gpt2_generate_main.py --is_interactive --conditional \
                      --checkpoint output/model.ckpt

Weights come from --checkpoint (written by gpt2_train_main.py) when given,
otherwise from OpenAI's checkpoint in --pretrain_model_dir (downloaded there on
first use). Runs on CUDA when present, CPU otherwise.
"""
import argparse
import os
import sys

import torch

from utils.errors import UserError, run_main
from utils.decoding.limits import GENERATION_MEMORY_FIX, MAX_SEED
from utils.decoding.limits import check_context_room, check_penalty_and_stops
from utils.decoding.settings import SamplingSettings
from utils.decoding.loading import decoding_device, load_for_decoding, turn_on_compiled_step
from utils.flags import add_model_args, add_sampling_args, check_batching, weight_flags
from utils.samples.output import check_output_path
from utils.decoding.stop_text import check_stop_texts
from utils.processor import EOS_ID
from utils.decoding.generation import generate
from utils.decoding.limits import out_of_memory_as_user_error
from utils.samples.interactive import StreamPrinter
from utils.samples.output import banner, closing_rule
from utils.data.pairs import source_context
from utils.samples.interactive import NotUTF8
from utils.samples.interactive import read_prompt
from utils.checkpoints.weights import resolve_model
from utils.samples.prompts import read_prompts
from utils.samples.prompts import Prompt
from utils.samples.prompts import encode_prompts
from utils.samples.prompts import write_samples
from utils.checkpoints.hf_hub import is_hub_name
from utils.checkpoints.openai_files import default_model_dir
from utils.processor import SHIPPED_VOCAB_DIR
from utils.checkpoints.weights import RELEASED_SIZES
from utils.output_safety import refuse_existing_output
from utils.output_safety import refuse_outputs_on_inputs
from utils.quick_exit import ending_without_teardown

# A long session: interactive, or decoding at least this many tokens (samples x
# --max_decoding_length per prompt). Only a long one repays what costs time at
# start: compiling the step (--compile auto) and huge pages for the weights
# (benchmarks/README.md, "Start-up").
LONG_SESSION_TOKENS = 1024
# --compile auto loads stored kernels for runs of at least this many tokens:
# loading and checking them against the eager step costs ~0.2 s (124M), which
# takes some 60 steps at the compiled step's speed-up to repay.
STORED_KERNELS_MIN_TOKENS = 128
COMPILE_HELP = ("Run the batch-1 CPU float32 decoding step as compiled kernels, "
                "built once per model shape, CPU and torch (AOTInductor: needs a "
                "C++ compiler; about a minute) and stored in your cache; later runs "
                "load them in a fraction of a second. auto (not on Intel CPUs, where "
                "they are no faster): use stored kernels for runs of at least "
                f"{STORED_KERNELS_MIN_TOKENS} tokens, and build them for interactive "
                f"sessions and runs of at least {LONG_SESSION_TOKENS} tokens, falling "
                "back to the uncompiled step if that fails; on: always, and fail if "
                "it cannot; off: never.")
# Scores are divided (or multiplied) by the penalty: 100 already bans a
# repeated token, and 1/100 makes it all but certain.


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
    parser.add_argument("--prompt", action="append", default=[],
                        help="A text to continue --nsamples times (repeatable).")
    parser.add_argument("--prompt_file", default=None,
                        help="A UTF-8 file of prompts, one a line (blank lines "
                             "skipped); - reads standard input.")
    parser.add_argument("--output_file", default=None,
                        help="Write the samples here instead of the screen: .jsonl "
                             "(one {prompt, sample, text} object a sample), .tsv "
                             "(prompt<TAB>text), or any other name for the screen's "
                             "format. Written atomically; never onto a file this "
                             "run reads.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing --output_file (without it, an "
                             "existing file is refused).")
    parser.add_argument("--stop_text", action="append", default=[],
                        help="End a sample at the first occurrence of this text, "
                             "which is left out (repeatable).")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="Divide (multiply, when negative) the scores of tokens "
                             "already in the text by this, as Hugging Face's "
                             "repetition_penalty; 1 is off, 1.2 is common.")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"Random seed, 0 to {MAX_SEED}: the same seed gives the "
                             f"same samples.")
    add_model_args(parser, compile_help=COMPILE_HELP)
    return parser.parse_args(argv)


def check_args(args) -> SamplingSettings:
    """Reject flag values that cannot work, before a model is loaded."""
    prompted = bool(args.prompt) or args.prompt_file is not None
    if args.is_interactive and (prompted or args.output_file or args.stop_text):
        raise UserError("--prompt, --prompt_file, --output_file and --stop_text do "
                        "not go with --is_interactive: leave out one or the other")
    if not prompted:  # from scratch, in batches of one "prompt", as the original
        check_batching(args.nsamples, args.batch_size)
    else:
        check_batching(args.nsamples, 1)
        check_batching(args.batch_size, 1)
    check_penalty_and_stops(args.decoding_strategy, args.repetition_penalty,
                            bool(args.stop_text))
    check_stop_texts(args.stop_text)
    check_output_path(args.output_file)
    check_output_file(args)
    if args.conditional and not (args.is_interactive or prompted):
        raise UserError("--conditional continues sources: give them with "
                        "--is_interactive, --prompt or --prompt_file")
    # int8 keeps the float32 weights (and adds 8-bit copies): estimate memory
    # as float32.
    return SamplingSettings.from_flags(
        args, batch_size=args.batch_size,
        dtype="float32" if args.dtype == "int8" else args.dtype)


def read_paths(args):
    """(flag, path) of everything a generate run may read: the model's files
    (the released models' default folders when no model flag is given), the
    prompts, the config module and the shipped vocabulary."""
    paths = [("--checkpoint", args.checkpoint),
             ("--pretrain_checkpoint's directory", os.path.dirname(
                 os.path.abspath(args.pretrain_checkpoint)) if args.pretrain_checkpoint
              else None),
             ("--prompt_file", None if args.prompt_file == "-" else args.prompt_file),
             ("--config_model", args.config_model),
             ("the shipped vocabulary", SHIPPED_VOCAB_DIR)]
    if args.pretrain_model_dir and not is_hub_name(args.pretrain_model_dir):
        paths.append(("--pretrain_model_dir", args.pretrain_model_dir))
    elif not args.pretrain_model_dir:
        paths += [("the default model directory", default_model_dir(name))
                  for name in RELEASED_SIZES]
    return paths


def check_output_file(args) -> None:
    """--output_file is never a file this run reads, nor an existing file
    without --overwrite (utils/output_safety.py); before any model is read."""
    if args.output_file is None:
        return
    refuse_outputs_on_inputs([("--output_file", args.output_file)], read_paths(args))
    refuse_existing_output(args.output_file, "--output_file", args.overwrite)


class SamplePrinter:
    """Generates and prints samples for one session: model, encoder, settings."""

    def __init__(self, model, encoder, settings: SamplingSettings, nsamples: int,
                 device, repetition_penalty: float = 1.0):
        self.model, self.encoder, self.settings = model, encoder, settings
        self.nsamples = nsamples
        self.repetition_penalty = repetition_penalty
        self.end_token = EOS_ID
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(settings.seed if settings.seed is not None
                             else torch.seed())

    def samples(self, context, on_tokens=None):
        """Continuation ids for `batch_size` copies of one context."""
        s = self.settings
        with out_of_memory_as_user_error(
                f"generating {s.batch_size} sample(s) of up to "
                f"{s.max_decoding_length} tokens", GENERATION_MEMORY_FIX):
            return generate(self.model, [context] * s.batch_size,
                            s.max_decoding_length, **s.generate_kwargs(),
                            end_token=self.end_token, generator=self.rng,
                            on_tokens=on_tokens,
                            repetition_penalty=self.repetition_penalty)

    def print_batches(self, context, stream: bool) -> None:
        """Print --nsamples samples for `context`, each under a SAMPLE banner."""
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
        print(closing_rule())
        sys.stdout.flush()


def print_banner(number: int) -> None:
    print(banner(number))


def prompt_context(session: SamplePrinter, raw_text: str, conditional: bool):
    """The token ids a prompt is continued from (see --conditional)."""
    if conditional:
        return source_context(raw_text.strip(), session.encoder.encode, session.end_token)
    return session.encoder.encode(raw_text)


def interactive_loop(session: SamplePrinter, conditional: bool = False) -> None:
    """Read prompts until EOF or Ctrl-C; continue each one."""
    settings = session.settings
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
            context = prompt_context(session, raw_text, conditional)
            check_context_room("the prompt is", len(context),
                               settings.max_decoding_length,
                               "shorten it or raise --max_decoding_length")
            session.print_batches(context, stream)
        except UserError as err:  # e.g. a prompt longer than the model allows
            print(f"error: {err}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def main(argv=None) -> int:
    args = parse_args(argv)

    settings = check_args(args)  # before loading, and maybe downloading, a model
    prompts = read_prompts(args.prompt, args.prompt_file)
    device = decoding_device(args.dtype, args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    resolved = resolve_model(**weight_flags(args))
    # A prompt may fill all but one position.
    prompted = args.is_interactive or args.prompt or args.prompt_file is not None
    longest = settings.max_decoding_length - 1 if prompted else 1
    # Before the weights are read or downloaded.
    settings.check_lengths(resolved.sizes["n_ctx"], longest)
    settings.check_memory(resolved.sizes, longest, device, model=resolved.describe())
    long_session = is_long_session(args, len(prompts))
    model, encoder = load_for_decoding(resolved, args.dtype, device, long_session)
    prepare_compiled_step(model, args, device, long_session,
                          planned_tokens(args, len(prompts)))

    session = SamplePrinter(model, encoder, settings, args.nsamples, device,
                          args.repetition_penalty)
    if args.is_interactive:
        interactive_loop(session, args.conditional)
        return 0
    write_prompt_samples(session, prompts, args)
    return 0


def planned_tokens(args, n_prompts: int) -> int:
    """The most tokens the run decodes (contexts included)."""
    return args.nsamples * args.max_decoding_length * max(1, n_prompts)


def is_long_session(args, n_prompts: int) -> bool:
    return args.is_interactive or planned_tokens(args, n_prompts) >= LONG_SESSION_TOKENS


def prepare_compiled_step(model, args, device: torch.device, long_session: bool,
                          tokens: int) -> None:
    """--compile: the batch-1 CPU step through compiled kernels
    (utils/decoding/compiled_step.py) when asked for, or (auto) when the run is
    long enough to repay loading stored ones, or building them."""
    if args.compile == "off":
        return
    supported = (device.type == "cpu" and args.dtype == "float32"
                 and args.batch_size == 1 and args.decoding_strategy != "beam")
    if not supported:
        if args.compile == "on":
            raise UserError("--compile on needs --device cpu, --dtype float32, "
                            "--batch_size 1 and greedy or sampled decoding (it "
                            "compiles the CPU batch-1 step): use --compile auto")
        return
    if args.compile == "auto" and not long_session and tokens < STORED_KERNELS_MIN_TOKENS:
        return
    turn_on_compiled_step(model, args.compile, worth_building=long_session)


def frame_sources(session: SamplePrinter, prompts, contexts):
    """--conditional: each prompt's ids as <|endoftext|> source <|endoftext|>."""
    framed = [[session.end_token] + ids + [session.end_token] for ids in contexts]
    for prompt, ids in zip(prompts, framed):
        check_context_room(f"the source on {prompt.where} is", len(ids),
                           session.settings.max_decoding_length,
                           "shorten it or raise --max_decoding_length")
    return framed


def write_prompt_samples(session: SamplePrinter, prompts, args) -> None:
    """The prompts' (or from-scratch) samples, to --output_file or the screen."""
    if prompts:
        contexts = encode_prompts(prompts, session.encoder,
                                  session.settings.max_decoding_length)
        if args.conditional:
            contexts = frame_sources(session, prompts, contexts)
    else:  # from scratch: every sample starts from <|endoftext|>
        prompts, contexts = [Prompt("", "")], [[session.end_token]]
    count = write_samples(session.model, session.encoder, session.settings, prompts,
                          contexts, nsamples=args.nsamples,
                          output_file=args.output_file, stop_texts=args.stop_text,
                          repetition_penalty=args.repetition_penalty,
                          generator=session.rng, end_token=session.end_token,
                          overwrite=args.overwrite)
    if args.output_file is not None:
        print(f"Wrote {count} samples of {len(prompts)} prompt(s) to "
              f"{args.output_file}.", file=sys.stderr)


if __name__ == "__main__":
    with ending_without_teardown():  # torch's teardown would add most of a second
        run_main(main)
