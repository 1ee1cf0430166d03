"""The metrics log: output_dir/metrics.jsonl, one JSON object per line, and
the same numbers as TensorBoard scalars when the config sets tensorboard_dir."""
import importlib.util
import json
import os
from typing import Optional

from utils.atomic import atomic_write
from utils.errors import UserError
from utils.json_file import parse_json


def check_tensorboard_installed(setting: str) -> None:
    """A one-line UserError when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"{setting} asks for TensorBoard logging but the tensorboard "
                        f"package is not installed: pip install tensorboard, or remove "
                        f"the setting (metrics.jsonl holds the same numbers)")


class MetricsLog:
    """JSON lines in output_dir/metrics.jsonl, one per display and evaluation.

    A new run starts the file afresh; a resumed run keeps the records up to
    the step it resumes from (dropping any written after that checkpoint, e.g.
    before a crash), so the file always describes one consistent run.
    """

    def __init__(self, path: str, resume_step: Optional[int], enabled: bool,
                 tensorboard_dir: Optional[str] = None):
        self.path, self.enabled = path, enabled
        self.tensorboard = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            self.tensorboard = _summary_writer(tensorboard_dir, resume_step)
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = parse_json(line)  # the project's one JSON reader
                    except ValueError:
                        continue  # a line cut short by a crash
                    step = record.get("step", 0) if isinstance(record, dict) else None
                    if isinstance(step, (int, float)) and step <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def write(self, **record) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: name the file
            if err.filename is None:
                raise OSError(err.errno, err.strerror, self.path) from err
            raise
        if self.tensorboard is not None:
            _add_scalars(self.tensorboard, record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _summary_writer(log_dir: str, resume_step: Optional[int]):
    """A SummaryWriter; a resumed run drops the events logged after its
    checkpoint's step (purge_step), as metrics.jsonl drops those records."""
    check_tensorboard_installed("tensorboard_dir")
    from torch.utils.tensorboard import SummaryWriter
    purge = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(log_dir=log_dir, purge_step=purge)


def _add_scalars(writer, record) -> None:
    """Each number of a record as the scalar '<split>/<name>' at its step."""
    split, step = record.get("split", "train"), record.get("step", 0)
    for name, value in record.items():
        if name not in ("split", "step") and isinstance(value, (int, float)):
            writer.add_scalar(f"{split}/{name}", value, step)
    writer.flush()
