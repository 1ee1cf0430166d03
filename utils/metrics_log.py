"""The metrics log: output_dir/metrics.jsonl, one JSON object per line."""
import json
import os
from typing import Optional

from utils.atomic import atomic_write



class MetricsLog:
    """JSON lines in output_dir/metrics.jsonl, one per display and evaluation.

    A new run starts the file afresh; a resumed run keeps the records up to
    the step it resumes from (dropping any written after that checkpoint, e.g.
    before a crash), so the file always describes one consistent run.
    """

    def __init__(self, path: str, resume_step: Optional[int], enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a crash
                    if record.get("step", 0) <= resume_step:
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
