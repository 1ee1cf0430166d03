"""Fine-tune GPT-2, evaluate dev perplexity, and continue test lines.

    python prepare_data.py --data_dir data/toy
    python gpt2_train_main.py --do_train --do_eval --do_test
        [--config_train configs.config_train] [--output_dir output]

--do_train  trains on <data_dir>/train.npy (data_dir comes from --config_train),
            evaluating dev.npy every eval_steps; writes <output_dir>/model.ckpt
            (every checkpoint_steps and at the end) and model_best.ckpt (best dev
            perplexity). With --checkpoint <output_dir>/model.ckpt it resumes
            exactly where that run stopped. Ctrl-C saves a checkpoint and exits.
            An --output_dir holding an earlier run's files is refused unless
            the run continues it (--checkpoint <output_dir>/model.ckpt) or
            --overwrite_output_dir deletes them. A loss that is not finite
            stops training (exit 2) without saving the diverged model.
--do_eval   prints the dev perplexity: exp(total NLL / total target tokens).
--do_test   continues every line of test.npy (the whole line is the context) and
            writes <output_dir>/test_samples.tsv: context<TAB>continuation.

One run at a time writes into an --output_dir (a lock file, <output_dir>/.lock).

Weights come from --checkpoint (a file written here) when given, else from a
random initialisation with --from_scratch, else from OpenAI's checkpoint
(--pretrain_checkpoint, default <pretrain_model_dir>/model.ckpt, downloaded on
first use). Runs on CUDA when present, CPU otherwise; --distributed trains on
several processes started by torchrun or mpirun.
"""
import argparse
import os
import re
import sys

import torch

from utils.atomic import (OutputDirLock, atomic_write, ensure_writable_dir,
                          remove_stale_temp_files)
from utils.flags import (MAX_SEED, SamplingSettings, add_sampling_args, add_weight_args,
                         weight_flags)
from utils.errors import UserError, run_main

TEST_SAMPLES = "test_samples.tsv"
# Characters that end a line for some reader (str.splitlines counts all of
# these), and the tab: replaced by a space inside TSV fields.
_TSV_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


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
    run = parser.add_argument_group("training run")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="Stop (and save) after this many optimizer steps in all; "
                          "the learning-rate schedule still spans max_train_epoch, "
                          "so a later --checkpoint run continues seamlessly.")
    run.add_argument("--distributed", action="store_true",
                     help="Data-parallel training in processes started by torchrun "
                          "or mpirun; evaluation and test run on rank 0.")
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


def check_args(args) -> None:
    """Reject flag values that cannot work before anything is loaded."""
    if not (args.do_train or args.do_eval or args.do_test):
        raise UserError("nothing to do: pass --do_train, --do_eval and/or --do_test")
    # Checked once; the test writer fills in --config_train's defaults.
    args.sampling = SamplingSettings.from_flags(args)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise UserError(f"--stop_after_steps must be at least 1 "
                        f"(got {args.stop_after_steps})")
    if args.overwrite_output_dir and not args.do_train:
        raise UserError("--overwrite_output_dir only applies to --do_train: drop it")


# ---------------------------------------------------------------- the output directory

def training_outputs():
    """The files a training run writes into --output_dir."""
    from utils.training import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_LOG
    return (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_LOG)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _in_dir(path: str, directory: str) -> bool:
    return _same_file(os.path.dirname(os.path.abspath(path)), directory)


def check_output_paths(args) -> None:
    """A directory where the run will write a file fails now, not at the first save."""
    names = (training_outputs() if args.do_train else ()) + (
        (TEST_SAMPLES,) if args.do_test else ())
    for name in names:
        path = os.path.join(args.output_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is a directory (or another non-file), but this run "
                            f"writes its {name} there: move it away, or choose another "
                            f"--output_dir")


def check_earlier_run(args, continues_in_place: bool) -> None:
    """Refuse to train into an --output_dir that holds another run's results.

    Allowed: no such files, --overwrite_output_dir, or a run that continues the
    one in the directory (`continues_in_place`: --checkpoint is that directory's
    training checkpoint). Only the files that exist are named.
    """
    out = args.output_dir
    found = [n for n in training_outputs() if os.path.lexists(os.path.join(out, n))]
    if not found:
        return
    if args.overwrite_output_dir:
        if args.checkpoint and any(_same_file(args.checkpoint, os.path.join(out, n))
                                   for n in found):
            raise UserError(f"--overwrite_output_dir would delete --checkpoint "
                            f"{args.checkpoint} itself: copy it out of {out} first, or "
                            f"drop --overwrite_output_dir to continue in place")
        return
    if continues_in_place:
        return
    if not args.checkpoint:
        why = "from an earlier run"
    elif _in_dir(args.checkpoint, out):
        why = (f"and --checkpoint {args.checkpoint} holds weights only, so training "
               f"would start at step 0 over them")
    else:
        why = f"that do not come from --checkpoint {args.checkpoint}"
    ways = []
    last_name = training_outputs()[0]
    last = os.path.join(out, last_name)
    if last_name in found and not (args.checkpoint and _same_file(args.checkpoint, last)):
        ways.append(f"continue that run with --checkpoint {last}")
    ways += ["pass --overwrite_output_dir to delete them and start over there",
             "choose another --output_dir"]
    raise UserError(f"--output_dir {out} already holds {', '.join(found)} {why}: "
                    + ", or ".join(ways))


def remove_earlier_run(output_dir: str) -> list:
    """--overwrite_output_dir: delete the earlier run's files, so that the new
    run's metrics.jsonl and model_best.ckpt never mix with the old ones."""
    removed = []
    for name in training_outputs():
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def check_token_ids(name: str, split, n_vocab: int) -> None:
    """Every real token of `split` must be an id of the model's vocabulary:
    an id out of range would index past the embedding (a crash mid-run, or
    on a GPU an unreadable device assert). Checked in bounded memory."""
    import numpy as np
    from utils.data import IDS_FIELD
    ids_on_disk = np.load(split.path, mmap_mode="r", allow_pickle=False)[IDS_FIELD]
    positions = np.arange(split.max_seq_length)
    rows = max(1, (1 << 22) // split.max_seq_length)
    for start in range(0, len(split), rows):
        ids = np.asarray(ids_on_disk[start:start + rows])
        real = positions[None, :] < split.lengths[start:start + rows, None]
        bad = real & ((ids >= n_vocab) | (ids < 0))
        if bad.any():
            row, position = np.argwhere(bad)[0]
            raise UserError(
                f"the {name} split {split.path} holds token id {int(ids[row, position])} "
                f"(example {start + int(row)} counting from 0, position {int(position)}), "
                f"outside the model's vocabulary of {n_vocab} ids (0 to {n_vocab - 1}): "
                f"prepare the data with the model's vocabulary, or use a model whose "
                f"n_vocab covers it")


def open_splits(args, cfg):
    """The prepared splits the requested steps need, checked before the model loads."""
    from utils.data import PreparedSplit, split_data_path
    wanted = {"train": args.do_train, "dev": args.do_eval, "test": args.do_test}
    if args.do_train and cfg.eval_steps > 0 and not args.do_eval:
        # Evaluation during training uses dev.npy when there is one.
        wanted["dev"] = os.path.isfile(split_data_path(cfg.data_dir, "dev"))
        if not wanted["dev"]:
            print(f"note: no {split_data_path(cfg.data_dir, 'dev')}: no dev evaluation "
                  f"during training (prepare a dev.txt to get one)", file=sys.stderr)
    splits = {}
    for name, needed in wanted.items():
        if not needed:
            splits[name] = None
            continue
        split = PreparedSplit(split_data_path(cfg.data_dir, name))
        if split.max_seq_length != cfg.max_seq_length:
            raise UserError(f"{split.path} was prepared with max_seq_length "
                            f"{split.max_seq_length} but {cfg.name} says "
                            f"{cfg.max_seq_length}: set max_seq_length = "
                            f"{split.max_seq_length} in the config, or run "
                            f"prepare_data.py --max_seq_length {cfg.max_seq_length}")
        splits[name] = split
    return splits


def load_weights(args, cfg, ctx):
    """(LoadedModel, training state to resume or None), following the flags.

    A --checkpoint is read once: its weights and its training state."""
    from utils import distributed as dist_utils
    from utils.weights import load_weights as build_and_fill, resolve_model
    # Rank 0 first: it may download OpenAI's files, which the others then read.
    if not ctx.is_main:
        dist_utils.barrier(ctx)
    resolved = resolve_model(**weight_flags(args))
    resume = resolved.training_state if args.do_train else None
    if args.do_train and args.checkpoint and resume is None and ctx.is_main:
        print(f"note: {args.checkpoint} holds weights only: training starts at "
              f"step 0 from them", file=sys.stderr)
    torch.manual_seed(cfg.seed)  # the same initial weights for --from_scratch
    loaded = build_and_fill(resolved)
    if ctx.is_main:
        dist_utils.barrier(ctx)
    return loaded, resume


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


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    from utils import distributed as dist_utils
    from utils.training import load_train_config

    cfg = load_train_config(args.config_train)
    splits = open_splits(args, cfg)
    writes_outputs = args.do_train or args.do_test
    if writes_outputs:
        ensure_writable_dir(args.output_dir, "--output_dir")
        check_output_paths(args)
    ctx = dist_utils.init_distributed(args.distributed, master_addr=args.master_addr,
                                      master_port=args.master_port)
    try:
        # Rank 0 alone writes, so it alone holds the directory's lock.
        with OutputDirLock(args.output_dir, "--output_dir",
                           enabled=writes_outputs and ctx.is_main):
            if writes_outputs and ctx.is_main:
                remove_stale_temp_files(args.output_dir,
                                        training_outputs() + (TEST_SAMPLES,))
            if args.do_train and ctx.is_main:
                check_earlier_run(args, continues_in_place=bool(args.checkpoint) and
                                  _in_dir(args.checkpoint, args.output_dir))
            return run(args, cfg, splits, ctx)
    finally:
        dist_utils.shutdown(ctx)


def run(args, cfg, splits, ctx) -> int:
    from utils import distributed as dist_utils
    from utils.model import count_parameters, model_size
    from utils.processor import get_encoder
    from utils.training import (BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_LOG,
                                Trainer, check_precision, evaluate)

    say = (lambda *a, **k: print(*a, **k, flush=True)) if ctx.is_main else (
        lambda *a, **k: None)
    check_precision(cfg.precision, ctx.device)
    loaded, resume = load_weights(args, cfg, ctx)
    if args.do_train and args.checkpoint and resume is None and ctx.is_main:
        check_earlier_run(args, continues_in_place=False)  # weights only: step 0
    sizes = model_size(loaded.hparams)
    n_ctx = sizes["n_ctx"]
    for name, split in splits.items():
        if split is None:
            continue
        if split.max_seq_length > n_ctx:
            raise UserError(f"{split.path} holds sequences of up to {split.max_seq_length} "
                            f"tokens but the model has {n_ctx} positions: prepare the "
                            f"data with --max_seq_length {n_ctx} or less")
        check_token_ids(name, split, sizes["n_vocab"])
    if args.do_test:
        check_test_lengths(splits["test"], args, cfg, n_ctx)
    model = loaded.model.to(ctx.device)
    say(f"Model: {loaded.source}, {count_parameters(model):,} parameters, "
        f"on {ctx.device}.", file=sys.stderr)
    progress = not args.quiet
    written = []

    trainer = None
    if args.do_train:
        if args.overwrite_output_dir and ctx.is_main:
            removed = remove_earlier_run(args.output_dir)
            if removed:
                say(f"note: --overwrite_output_dir: deleted the earlier run's "
                    f"{', '.join(removed)} in {args.output_dir}", file=sys.stderr)
        trainer = Trainer(model, loaded.hparams, cfg, ctx, splits["train"], splits["dev"],
                          args.output_dir, resume=resume,
                          stop_after_steps=args.stop_after_steps, progress=progress)
        trainer.train()
        written.append((LAST_CHECKPOINT, "last training state (continue with "
                        f"--do_train --checkpoint "
                        f"{os.path.join(args.output_dir, LAST_CHECKPOINT)})"))
        if trainer.best_dev_ppl is not None:
            written.append((BEST_CHECKPOINT, f"best dev perplexity "
                            f"{trainer.best_dev_ppl:.6g}"))
        written.append((METRICS_LOG, "training and dev metrics, one JSON per line"))

    if args.do_eval:
        if trainer is not None:
            same_step = trainer.last_eval_step == trainer.step
            result = trainer.last_eval if same_step else trainer.evaluate_and_track()
            if trainer.best_dev_ppl is not None and not any(
                    name == BEST_CHECKPOINT for name, _ in written):
                written.append((BEST_CHECKPOINT, f"best dev perplexity "
                                f"{trainer.best_dev_ppl:.6g}"))
        elif ctx.is_main:
            result = evaluate(model, splits["dev"], cfg.eval_batch_size, ctx.device,
                              cfg.precision, progress)
        if ctx.is_main:
            print(result.describe("dev"), flush=True)
        dist_utils.barrier(ctx)

    if args.do_test:
        if ctx.is_main:
            path = os.path.join(args.output_dir, TEST_SAMPLES)
            encoder = get_encoder(loaded.vocab_dir)
            count = write_test_samples(model, splits["test"], encoder, args, cfg,
                                       ctx.device, n_ctx, path, progress)
            written.append((TEST_SAMPLES, f"{count} test lines: context<TAB>continuation"))
        dist_utils.barrier(ctx)

    if written:
        say(f"Outputs in {args.output_dir}/:")
        for name, what in written:
            say(f"  {os.path.join(args.output_dir, name)}: {what}")
    return 0


if __name__ == "__main__":
    run_main(main)
