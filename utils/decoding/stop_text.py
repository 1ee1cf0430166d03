"""--stop_text: end a sample at the first occurrence of a text, and stop decoding that row there.

`StopTexts` is generate()'s `stop_check`: after each step it adds the new
token's bytes to each row's tail and searches only that tail (the new bytes
and the stop texts' length before them), so a step costs the same however
long the sample is. The search is on UTF-8 bytes: a stop text's bytes occur in
a sample's bytes exactly where the text occurs in its decoded text (a UTF-8
sequence starts on a byte no other sequence can swallow). `cut_at_stop` cuts
the decoded text there; the stop text is not included.
"""
from typing import List, Sequence

import torch

from utils.errors import UserError


def check_stop_texts(texts: Sequence[str]) -> None:
    for text in texts:
        if not text:
            raise UserError("--stop_text must not be empty: give the text a sample "
                            "ends at, e.g. --stop_text $'\\n\\n'")


class StopTexts:
    """Rows whose decoded text reached one of `texts`, step by step."""

    def __init__(self, encoder, texts: Sequence[str], rows: int):
        self.encoder = encoder
        self.patterns = [text.encode("utf-8") for text in texts]
        self.keep = max(len(p) for p in self.patterns) - 1
        self.tails: List[bytes] = [b""] * rows

    def __call__(self, new_ids: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        stop = [False] * len(self.tails)
        for row, (token, finished) in enumerate(zip(new_ids.tolist(), done.tolist())):
            if finished:
                continue
            tail = self.tails[row] + self.encoder.decode_bytes([token])
            stop[row] = any(p in tail for p in self.patterns)
            self.tails[row] = tail[max(0, len(tail) - self.keep):] if self.keep else b""
        return torch.tensor(stop, dtype=torch.bool)


def cut_at_stop(text: str, texts: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of `texts`."""
    found = [i for i in (text.find(t) for t in texts) if i >= 0]
    return text[:min(found)] if found else text
