"""Convert a GPT-2 between our checkpoints, Hugging Face's and OpenAI's formats.

    python convert_checkpoint.py SRC DST --format {hf,openai,ckpt} [--force]
        [--vocab_dir DIR] [--merge_lora [--lora_base BASE]]

SRC, its format told by its files: a `.ckpt` written by gpt2_train_main.py,
an OpenAI model directory (hparams.json, model.ckpt.*), a Hugging Face GPT-2
directory (config.json, model.safetensors), or hf:NAME (fetched from the
Hugging Face Hub when huggingface_hub is installed).

A LoRA run's checkpoint (`lora` in the training config) holds adapters, not
a model: --merge_lora loads the base model it names (or --lora_base: a .ckpt,
an OpenAI or Hugging Face directory, or hf:NAME), merges the adapters into
its weights and converts the result.

DST, by --format:
  hf      a directory transformers' AutoModelForCausalLM.from_pretrained and
          AutoTokenizer.from_pretrained load with no other file (config.json,
          generation_config.json, model.safetensors, vocab.json, merges.txt,
          tokenizer_config.json, special_tokens_map.json);
  openai  a directory of OpenAI's seven files (checkpoint, hparams.json,
          encoder.json, vocab.bpe, model.ckpt.index, model.ckpt.data-00000-of-00001,
          model.ckpt.meta) that TensorFlow reads;
  ckpt    one file in our format, weights only, for --checkpoint.

The vocabulary goes along: SRC's own when it has one, else (and for a .ckpt,
unless --vocab_dir names the one it was trained with) GPT-2's. The weights
are written as float32. A new or empty DST is written; --force writes into a
non-empty one, replacing only the files of the same names (see
utils/checkpoints/convert.py). Nothing is half-written: a failure leaves DST as it was.
DST is never a file this run reads; one conversion at a time writes a DST.
"""
import argparse
import os
import sys
import time

from utils.errors import run_main
from utils.memory import format_bytes
from utils.checkpoints.convert import check_destination
from utils.checkpoints.convert import open_source
from utils.checkpoints.convert import write_destination
from utils.checkpoints.convert import claim_destination
from utils.model import parameter_count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC",
                        help="A .ckpt file, an OpenAI or Hugging Face model directory, "
                             "or hf:NAME.")
    parser.add_argument("dst", metavar="DST",
                        help="The directory to write (the file, for --format ckpt).")
    parser.add_argument("--format", required=True, choices=("hf", "openai", "ckpt"),
                        help="What to write: hf (Hugging Face), openai (OpenAI's TF "
                             "checkpoint), ckpt (ours).")
    parser.add_argument("--force", action="store_true",
                        help="Write into a DST that is not empty, replacing the files "
                             "of the same names (a ckpt DST file is replaced).")
    parser.add_argument("--vocab_dir", default=None,
                        help="For a .ckpt SRC: the directory of the vocabulary it was "
                             "trained with (encoder.json + vocab.bpe, or vocab.json + "
                             "merges.txt); default GPT-2's.")
    parser.add_argument("--merge_lora", action="store_true",
                        help="SRC is a LoRA run's adapter checkpoint: write its base "
                             "model with the adapters merged into the weights.")
    parser.add_argument("--lora_base", default=None,
                        help="With --merge_lora: the base model to merge into "
                             "(default: the one the checkpoint names).")
    return parser.parse_args(argv)


def _summary(paths, seconds: float) -> str:
    lines = [f"  {os.path.basename(p):34s} {format_bytes(os.path.getsize(p)):>12s}"
             for p in paths]
    total = sum(os.path.getsize(p) for p in paths)
    return "\n".join(lines + [f"{len(paths)} file(s), {format_bytes(total)}, "
                              f"in {seconds:.1f} s."])


def main(argv=None) -> int:
    args = parse_args(argv)

    start = time.time()
    checks = (args.dst, args.format, args.force, args.src, args.vocab_dir)
    check_destination(*checks)  # before SRC is read
    with claim_destination(args.dst, args.format) as claim:
        check_destination(*checks)  # again, now that no other run can write DST
        source = open_source(args.src, args.vocab_dir, args.merge_lora, args.lora_base)
        if args.vocab_dir is not None and source.kind not in ("ckpt", "merged"):
            print(f"note: --vocab_dir is for a .ckpt SRC; {args.src} has its own "
                  f"vocabulary or GPT-2's", file=sys.stderr)
        print(f"Converting {source.describe()}, {parameter_count(source.sizes):,} "
              f"parameters, to {args.format} in {args.dst}.", file=sys.stderr)
        written = write_destination(source, args.dst, args.format, claim, args.force)
    print(f"Wrote {args.dst} ({args.format}):")
    print(_summary(written, time.time() - start))
    return 0


if __name__ == "__main__":
    run_main(main)
