"""The rules for gpt2_train_main.py's --output_dir: a user's results are never lost.

- A path where the run will write a file must not be a directory (checked
  before anything loads, not at the first save).
- One run at a time writes there: rank 0 holds <output_dir>/.lock while it runs,
  and first removes temporary files a killed run left behind (utils/atomic.py
  names and cleans them).
- Training refuses a directory holding an earlier run's files, unless the run
  continues that one (--checkpoint <output_dir>/model.ckpt) or
  --overwrite_output_dir deletes them once every check has passed.
"""
import contextlib
import os

from utils.atomic import OutputDirLock, ensure_writable_dir, remove_stale_temp_files
from utils.errors import UserError
from utils.samples.test_split import TEST_SAMPLES
from utils.training.trainer import TRAINING_OUTPUTS
from utils.checkpoints.weights import LAST_CHECKPOINT


def check_output_dir(args) -> None:
    """--output_dir can be written, and holds no directory where a file goes."""
    ensure_writable_dir(args.output_dir, "--output_dir")
    names = (TRAINING_OUTPUTS if args.do_train else ()) + (
        (TEST_SAMPLES,) if args.do_test else ())
    for name in names:
        path = os.path.join(args.output_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UserError(f"{path} is a directory (or another non-file), but this run "
                            f"writes its {name} there: move it away, or choose another "
                            f"--output_dir")


@contextlib.contextmanager
def output_dir_claimed(args, enabled: bool):
    """Hold --output_dir's lock (when `enabled`: rank 0 alone writes), clean up
    a killed run's temporary files, and refuse an earlier run's results."""
    with OutputDirLock(args.output_dir, "--output_dir", enabled=enabled):
        if enabled:
            remove_stale_temp_files(args.output_dir, TRAINING_OUTPUTS + (TEST_SAMPLES,))
            if args.do_train:
                check_earlier_run(args, continues_in_place=bool(args.checkpoint) and
                                  _in_dir(args.checkpoint, args.output_dir))
        yield


def check_earlier_run(args, continues_in_place: bool) -> None:
    """Refuse to train into an --output_dir that holds another run's results.

    Allowed: no such files, --overwrite_output_dir, or a run that continues the
    one in the directory (`continues_in_place`: --checkpoint is that directory's
    training checkpoint). Only the files that exist are named.
    """
    out = args.output_dir
    found = [n for n in TRAINING_OUTPUTS if os.path.lexists(os.path.join(out, n))]
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
    last = os.path.join(out, LAST_CHECKPOINT)
    if LAST_CHECKPOINT in found and not (args.checkpoint and
                                         _same_file(args.checkpoint, last)):
        ways.append(f"continue that run with --checkpoint {last}")
    ways += ["pass --overwrite_output_dir to delete them and start over there",
             "choose another --output_dir"]
    raise UserError(f"--output_dir {out} already holds {', '.join(found)} {why}: "
                    + ", or ".join(ways))


def remove_earlier_run(output_dir: str) -> list:
    """--overwrite_output_dir: delete the earlier run's files, so that the new
    run's metrics.jsonl and model_best.ckpt never mix with the old ones."""
    removed = []
    for name in TRAINING_OUTPUTS:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _in_dir(path: str, directory: str) -> bool:
    return _same_file(os.path.dirname(os.path.abspath(path)), directory)
