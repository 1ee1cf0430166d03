"""One row's completion text as its tokens arrive: whole characters, cut at
the first stop string, released for streaming piece by piece.

A BPE token may end inside a UTF-8 character: its bytes wait in an
incremental decoder until the character is whole. Stop strings are searched
in the text (only where a new piece could complete one); the text is cut
before the first and the stop string itself is never returned. Streaming
holds back the end of the text while it could still be the start of a stop
string, so no client ever sees text that a stop string later removes.
"""
import codecs
from typing import Sequence


class RowText:
    def __init__(self, encoder, stops: Sequence[str]):
        self.encoder = encoder
        self.stops = tuple(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.released = 0     # characters of text handed out so far
        self.stopped = False  # a stop string was found (the text is cut)

    def add(self, token: int) -> None:
        """Append a generated token's bytes (whole characters only)."""
        self._append(self.decoder.decode(self.encoder.decode_bytes([token])))

    def finish(self) -> None:
        """The row ended: a cut character at the end becomes U+FFFD."""
        if not self.stopped:
            self._append(self.decoder.decode(b"", final=True))

    def _append(self, piece: str) -> None:
        if self.stopped or not piece:
            return
        search_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, search_from) for s in self.stops)
                 if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True

    def release(self, final: bool) -> str:
        """The text not handed out yet, less (unless `final` or stopped) an
        end that may begin a stop string."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        piece = self.text[self.released:max(end, self.released)]
        self.released += len(piece)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        for size in range(min(len(self.text), self.longest_stop - 1), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
