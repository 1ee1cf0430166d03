"""A LoRA training run (`lora` in the training config): adapters on, base frozen, and resume.

utils/lora.py holds the adapters themselves and the checkpoint fields; here
the trainer's side: a new run names its base model and draws its adapters
from the config's seed (the same on every rank), and a resumed one must be
an adapter checkpoint of the same shape of adapters.
"""
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from utils import lora
from utils.errors import UserError

_MERGE_HINT = ("merge its adapters first (convert_checkpoint.py --merge_lora CKPT "
               "merged.ckpt --format ckpt) and train on merged.ckpt")


class LoraRun:
    """The settings and base record of a LoRA run; None-safe via `start`."""

    def __init__(self, settings: lora.LoraSettings, base: Dict[str, Any]):
        self.settings = settings
        self.base = base

    @classmethod
    def start(cls, model: nn.Module, settings: Optional[lora.LoraSettings],
              base: Optional[Tuple[str, str]], resume: Optional[Dict[str, Any]],
              seed: int) -> Optional["LoraRun"]:
        """Put adapters on `model` as `settings` say (None: a full fine-tune,
        which must not resume an adapter checkpoint); `base` is the base
        model's (kind, path) from utils.checkpoints.weights.lora_base_of."""
        resumes_adapters = resume is not None and lora.is_adapter_checkpoint(resume)
        if settings is None:
            if resumes_adapters:
                raise UserError("the --checkpoint holds LoRA adapters but the training "
                                "config has no lora: set lora as it was "
                                f"({resume.get('lora')}), or {_MERGE_HINT}")
            return None
        if resume is not None and not resumes_adapters:
            raise UserError("lora is set in the training config but the --checkpoint "
                            "is a full fine-tune's training state: remove lora to "
                            "continue it, or train adapters on its weights from a "
                            "weights-only copy (convert_checkpoint.py CKPT base.ckpt "
                            "--format ckpt)")
        if base is None:
            raise ValueError("a LoRA run needs its base model's (kind, path)")
        if resumes_adapters:
            saved = lora.read_adapter_checkpoint(resume, "--checkpoint")[0]
            different = [name for name in ("rank", "alpha", "targets")
                         if getattr(saved, name) != getattr(settings, name)]
            if different:
                raise UserError(
                    f"the --checkpoint's adapters were trained with "
                    f"{', '.join(f'{n} {getattr(saved, n)!r}' for n in different)} but "
                    f"the training config's lora sets "
                    f"{', '.join(f'{n} {getattr(settings, n)!r}' for n in different)}: "
                    f"resume with the same lora settings, or {_MERGE_HINT}")
        run = cls(settings, lora.base_record(*base, model, settings))
        torch.manual_seed(seed)  # the same adapters on every rank and in every run
        lora.add_adapters(model, settings)
        if resumes_adapters:
            lora.load_adapter_state(model, resume["lora_adapters"], "--checkpoint")
        return run

    def checkpoint_fields(self, model: nn.Module) -> Dict[str, Any]:
        """The adapters and base record, in place of a checkpoint's "model"."""
        return lora.adapter_fields(model, self.settings, self.base)
