r"""Fine-tune GPT-2, evaluate dev perplexity, and continue test lines.

    python prepare_data.py --data_dir data/toy
    python gpt2_train_main.py --do_train --do_eval --do_test
        [--config_train configs.config_train] [--output_dir output]
    python gpt2_train_main.py --do_train --do_eval --data_dir my_text \
        --max_train_epoch 1 --lr 1e-4 --set eval_steps=200 --output_dir my_out

Every training setting comes from --config_train, or from a flag laid over it:
--data_dir, --max_seq_length, --max_train_epoch, --max_steps, --lr,
--train_batch_size, and --set key=value for any other field of
configs/config_train.py. max_seq_length, when neither sets it, is the one
prepare_data.py recorded in <data_dir>/prepared.json. A training run's log
starts with every setting in force and where it came from.

--do_train  trains on <data_dir>/train.npy,
            evaluating dev.npy every eval_steps; writes <output_dir>/model.ckpt
            (every checkpoint_steps and at the end) and model_best.ckpt (best dev
            perplexity). With --checkpoint <output_dir>/model.ckpt it resumes
            exactly where that run stopped. Ctrl-C saves a checkpoint and exits.
            An --output_dir holding an earlier run's files is refused unless
            the run continues it (--checkpoint <output_dir>/model.ckpt) or
            --overwrite_output_dir deletes them. A loss that is not finite
            stops training (exit 2) without saving the diverged model.
--do_eval   prints the dev perplexity: exp(total NLL / total target tokens).
            After training, the final model is evaluated before model.ckpt is
            last saved, so that it holds the best dev perplexity.
--do_test   continues every line of test.npy (the whole line is the context) and
            writes <output_dir>/test_samples.tsv: context<TAB>continuation
            (source<TAB>generated target[<TAB>reference] for .tsv pairs).

One run at a time writes into an --output_dir (a lock file, <output_dir>/.lock).

Weights come from --checkpoint (a file written here) when given, else from a
random initialisation with --from_scratch, else from OpenAI's checkpoint
(--pretrain_checkpoint, default <pretrain_model_dir>/model.ckpt, downloaded on
first use). Runs on --device (default: CUDA when present, CPU otherwise);
--distributed trains on several processes started by torchrun or mpirun.
"""
import argparse
import os
import sys
from typing import NamedTuple

import torch

from utils.decoding.limits import MAX_SEED
from utils.decoding.settings import SamplingSettings
from utils.flags import add_sampling_args, add_weight_args, weight_flags
from utils.device import add_device_arg, resolve_device
from utils.errors import UserError, run_main
from utils.training import distributed as dist_utils
from utils.checkpoints.weights import load_weights, lora_base_of
from utils.lora import has_adapters, merge_adapters
from utils.checkpoints.weights import resolve_model
from utils.heap import map_large_blocks_separately
from utils.training.output_dir import check_output_dir
from utils.training.output_dir import output_dir_claimed
from utils.training.config import LR_SETTING, describe_settings, load_train_config
from utils.training.config import parse_set_values
from utils.training.train_data import open_splits
from utils.training.lm import evaluate
from utils.model import count_parameters, load_model_hparams
from utils.model import model_size
from utils.training.output_dir import check_earlier_run
from utils.samples.test_split import sampling_for_test_split
from utils.training.config import check_precision
from utils.training.train_data import check_splits_fit_model
from utils.training.output_dir import remove_earlier_run
from utils.training.trainer import Trainer
from utils.processor import get_encoder
from utils.samples.test_split import TEST_SAMPLES
from utils.samples.test_split import write_test_samples


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to do")
    what.add_argument("--do_train", action="store_true", help="Train on train.npy.")
    what.add_argument("--do_eval", action="store_true",
                      help="Print the dev perplexity (after training, if training).")
    what.add_argument("--do_test", action="store_true",
                      help="Continue the test lines into <output_dir>/test_samples.tsv.")
    model = parser.add_argument_group("configs and weights")
    model.add_argument("--config_train", default="configs.config_train",
                       help="Training config: a module name or a .py path "
                            "(default configs.config_train).")
    add_weight_args(
        model,
        config_model_help="Model config: a module name or a .py path. Default: the "
                          "size in hparams.json or in the --checkpoint; with "
                          "--from_scratch, configs.config_model_117M.",
        checkpoint_help="A checkpoint written by this script: its weights are "
                        "used, and with --do_train its training state too.")
    model.add_argument("--from_scratch", action="store_true",
                       help="Start from random weights built from --config_model "
                            "instead of OpenAI's checkpoint.")
    model.add_argument("--output_dir", default="output",
                       help="Where checkpoints, metrics.jsonl and test_samples.tsv "
                            "go (default output).")
    model.add_argument("--overwrite_output_dir", action="store_true",
                       help="With --do_train: delete the model.ckpt, model_best.ckpt "
                            "and metrics.jsonl of an earlier run in --output_dir when "
                            "training starts (after every check has passed), instead "
                            "of refusing to train there.")
    settings = parser.add_argument_group(
        "training settings (over --config_train's; see configs/config_train.py)")
    settings.add_argument("--data_dir", default=None,
                          help="The directory prepare_data.py wrote the splits to.")
    settings.add_argument("--max_seq_length", type=int, default=None,
                          help="Must equal the data's (default: the length recorded "
                               "in <data_dir>/prepared.json).")
    settings.add_argument("--max_train_epoch", type=int, default=None,
                          help="Passes over train.npy; the learning-rate schedule "
                               "spans them.")
    settings.add_argument("--max_steps", type=int, default=None,
                          help="Train exactly this many optimizer steps (the "
                               "schedule spans them), whatever max_train_epoch says.")
    settings.add_argument("--lr", type=float, default=None,
                          help="The optimizer's peak learning rate (opt's lr).")
    settings.add_argument("--train_batch_size", type=int, default=None,
                          help="Examples per optimizer step, per process.")
    settings.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          dest="set_values",
                          help="Any other training setting, e.g. --set "
                               "eval_steps=200 --set sample_prompts='[\"\", "
                               "\"Chapter\"]' (repeatable; values are Python "
                               "literals, or plain text).")
    run = parser.add_argument_group("training run")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="Stop (and save) after this many optimizer steps in all; "
                          "the learning-rate schedule still spans max_train_epoch, "
                          "so a later --checkpoint run continues seamlessly.")
    run.add_argument("--distributed", action="store_true",
                     help="Data-parallel training in processes started by torchrun "
                          "or mpirun; evaluation and test run on rank 0.")
    add_device_arg(run)
    run.add_argument("--master_addr", default=None,
                     help="With mpirun across machines: the rank-0 host.")
    run.add_argument("--master_port", type=int, default=None,
                     help="With mpirun: a free TCP port on the rank-0 host.")
    run.add_argument("--quiet", action="store_true",
                     help="No progress bars (the log lines remain). Bars are also "
                          "off when stderr is not a terminal.")
    sample = parser.add_argument_group("sampling for --do_test")
    add_sampling_args(sample, max_decoding_length_default=None,
                      max_decoding_length_help="Most tokens per sample, the context "
                      "included (default: max_decoding_length of --config_train).")
    sample.add_argument("--seed", type=int, default=None,
                        help=f"Sampling seed, 0 to {MAX_SEED} (default: seed of "
                             f"--config_train).")
    return parser.parse_args(argv)


class Choices(NamedTuple):
    """What check_args makes of the flags."""
    sampling: SamplingSettings  # for --do_test; the config fills in the gaps
    device_choice: dict         # init_distributed's device arguments


# The flags that set a training setting of the same name (LR_SETTING: opt's lr).
SETTING_FLAGS = ("data_dir", "max_seq_length", "max_train_epoch", "max_steps",
                 LR_SETTING, "train_batch_size")


def setting_overrides(args) -> dict:
    """{setting: value} of the settings flags and --set, for load_train_config."""
    overrides = parse_set_values(args.set_values)
    for key in SETTING_FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key in overrides:
            raise UserError(f"--{key} and --set {key}= are both given: keep one")
        overrides[key] = value
    return overrides


def check_args(args) -> Choices:
    """Reject flag values that cannot work before anything is loaded."""
    if not (args.do_train or args.do_eval or args.do_test):
        raise UserError("nothing to do: pass --do_train, --do_eval and/or --do_test")
    sampling = SamplingSettings.from_flags(args)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise UserError(f"--stop_after_steps must be at least 1 "
                        f"(got {args.stop_after_steps})")
    if args.overwrite_output_dir and not args.do_train:
        raise UserError("--overwrite_output_dir only applies to --do_train: drop it")
    return Choices(sampling, device_choice(args.device, args.distributed))


def device_choice(name: str, distributed: bool):
    """init_distributed's keyword arguments for --device: the device of a
    single process, or the backend of a --distributed job (its ranks each
    use the GPU of their local rank, or the CPU)."""
    if not distributed:
        return {"device": resolve_device(name)}
    if name == "auto":
        return {}
    if name == "cpu":
        return {"backend": "gloo"}
    if name == "cuda":
        resolve_device(name)  # present?
        return {"backend": "nccl"}
    raise UserError(f"--device {name} with --distributed: each rank uses the GPU of "
                    f"its local rank, so use --device auto, cuda or cpu")



def load_run_weights(args, cfg, ctx):
    """(LoadedModel, training state to resume or None, LoRA base (kind, path)
    or None), following the flags.

    A --checkpoint is read once: its weights and its training state. An
    adapter checkpoint's adapters are merged into its base, unless training
    resumes them."""
    # Rank 0 first: it may download OpenAI's files, which the others then read.
    if not ctx.is_main:
        dist_utils.barrier(ctx)
    resolved = resolve_model(**weight_flags(args))
    resume = resolved.training_state if args.do_train else None
    lora_base = lora_base_of(resolved) if args.do_train and cfg.lora is not None else None
    if args.do_train and resolved.adapters is not None and resume is None:
        raise UserError(f"{args.checkpoint} holds LoRA adapters without a training "
                        f"state, so training cannot continue them: merge them first "
                        f"(convert_checkpoint.py --merge_lora {args.checkpoint} "
                        f"merged.ckpt --format ckpt) and train on merged.ckpt")
    if args.do_train and args.checkpoint and resume is None and ctx.is_main:
        print(f"note: {args.checkpoint} holds weights only: training starts at "
              f"step 0 from them", file=sys.stderr)
    torch.manual_seed(cfg.seed)  # the same initial weights for --from_scratch
    if args.do_train and resolved.with_memory:
        raise UserError("this model keeps cross-attention (memory mode), but "
                        "gpt2_train_main.py feeds no memory, so it would train "
                        "without it: train memory-mode models from Python "
                        "(examples/README.md)")
    loaded = load_weights(resolved, apply_adapters=not args.do_train)
    if ctx.is_main:
        dist_utils.barrier(ctx)
    return loaded, resume, lora_base


def main(argv=None) -> int:
    args = parse_args(argv)
    choices = check_args(args)
    cfg = load_train_config(args.config_train, setting_overrides(args))
    if cfg.asks_for_less_memory():
        map_large_blocks_separately()  # less peak memory, at some speed
    if args.config_model:  # refused before any output directory is made
        load_model_hparams(args.config_model)
    splits = open_splits(args, cfg)
    writes_outputs = args.do_train or args.do_test
    if writes_outputs:
        check_output_dir(args)
    ctx = dist_utils.init_distributed(args.distributed, master_addr=args.master_addr,
                                      master_port=args.master_port,
                                      **choices.device_choice)
    try:
        # Rank 0 alone writes, so it alone holds the directory's lock.
        with output_dir_claimed(args, enabled=writes_outputs and ctx.is_main):
            return run(args, cfg, splits, ctx, choices.sampling)
    finally:
        dist_utils.shutdown(ctx)


def run(args, cfg, splits, ctx, sampling: SamplingSettings) -> int:
    if args.do_train:
        ctx.print("\n".join(describe_settings(cfg)), flush=True)
    check_precision(cfg.precision, ctx.device)
    loaded, resume, lora_base = load_run_weights(args, cfg, ctx)
    if args.do_train and args.checkpoint and resume is None and ctx.is_main:
        check_earlier_run(args, continues_in_place=False)  # weights only: step 0
    sizes = model_size(loaded.hparams)
    check_splits_fit_model(splits, sizes["n_ctx"], sizes["n_vocab"])
    if args.do_test:
        sampling = sampling_for_test_split(splits["test"], sampling, cfg, sizes["n_ctx"])
    model = loaded.model.to(ctx.device)
    ctx.print(f"Model: {loaded.source}, {count_parameters(model):,} parameters, "
              f"on {ctx.device}.", file=sys.stderr)

    trainer = None
    if args.do_train:
        trainer = run_training(args, cfg, splits, ctx, model, loaded.hparams, resume,
                               lora_base)
    if args.do_eval:
        if trainer is not None:
            result = trainer.evaluate_at_final_step()
        elif ctx.is_main:
            result = evaluate(model, splits["dev"], cfg.eval_batch_size, ctx.device,
                              cfg.precision, progress=not args.quiet)
        if ctx.is_main:
            print(result.describe("dev"), flush=True)
        dist_utils.barrier(ctx)
    written = trainer.outputs() if trainer is not None else []
    if has_adapters(model):  # saved; the decoding engine reads merged weights
        merge_adapters(model)
    if args.do_test and trainer is not None:
        # Sharded: rank 0 decodes a whole copy, gathered tensor by tensor.
        model = trainer.unsharded_model()
    if args.do_test:
        written += run_test(args, cfg, splits["test"], ctx, model, loaded.vocab_dir,
                            sampling)
    if written:
        ctx.print(f"Outputs in {args.output_dir}/:")
        for name, what in written:
            ctx.print(f"  {os.path.join(args.output_dir, name)}: {what}")
    if trainer is not None:
        trainer.log.close()
    return 0


def run_training(args, cfg, splits, ctx, model, model_hparams, resume, lora_base):
    """--do_train: the Trainer, once it has trained."""
    if args.overwrite_output_dir and ctx.is_main:
        removed = remove_earlier_run(args.output_dir)
        if removed:
            ctx.print(f"note: --overwrite_output_dir: deleted the earlier run's "
                     f"{', '.join(removed)} in {args.output_dir}", file=sys.stderr)
    trainer = Trainer(model, model_hparams, cfg, ctx, splits["train"], splits["dev"],
                      args.output_dir, resume=resume,
                      stop_after_steps=args.stop_after_steps, progress=not args.quiet,
                      lora_base=lora_base)
    # With --do_eval the final evaluation comes before the last save.
    trainer.train(final_eval=args.do_eval)
    return trainer


def run_test(args, cfg, split, ctx, model, vocab_dir, settings: SamplingSettings):
    """--do_test on rank 0 (the others wait); the file it wrote, described."""
    written = []
    if ctx.is_main:
        path = os.path.join(args.output_dir, TEST_SAMPLES)
        count, notes = write_test_samples(model, split, get_encoder(vocab_dir), settings,
                                          cfg, ctx.device, path, progress=not args.quiet)
        for note in notes:
            print(f"note: {note}", flush=True)
        layout = ("source<TAB>generated target[<TAB>reference]" if split.conditional
                  else "context<TAB>continuation")
        written.append((TEST_SAMPLES, f"{count} test lines: {layout}"))
    dist_utils.barrier(ctx)
    return written


if __name__ == "__main__":
    run_main(main)
