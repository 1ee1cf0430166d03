"""gpt2_generate_main.py's terminal side: reading prompts, printing samples as they come."""
import sys

PROMPT = "Model input >>> "


class StreamPrinter:
    """Prints one row's tokens as they are made, whole characters at a time.

    A BPE token can end in the middle of a UTF-8 character, so the ids since
    the last whole character are kept and decoded together; once they end in
    a whole character their text is printed and they are dropped. Each step
    decodes only those few ids (re-decoding the whole sample at every step
    made printing cost grow with the sample's length).
    """

    def __init__(self, encoder, end_token: int, out=None):
        self.encoder, self.end_token = encoder, end_token
        self.out = out or sys.stdout
        self.pending, self.finished = [], False

    def __call__(self, new_ids, done) -> None:
        """new_ids, done: generate's on_tokens arguments (tensors or lists);
        row 0 is printed."""
        if self.finished:
            return
        token = int(new_ids[0])
        if token == self.end_token:
            self.finished = True
            return
        self.pending.append(token)
        text = self.encoder.decode(self.pending)
        if not text.endswith("\ufffd"):
            self._emit(text)
        self.finished = bool(done[0])

    def close(self) -> None:
        if self.pending:
            self._emit(self.encoder.decode(self.pending))

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.pending = []


class NotUTF8(ValueError):
    """A line of input that is not valid UTF-8 text."""


def read_prompt() -> str:
    """Print the prompt and read one line of stdin, without its line ending.

    Reads bytes and decodes each line alone, so a line that is not UTF-8 is
    reported (NotUTF8) and the lines after it are still read (input() would
    lose them: its decoder fails on a whole buffered chunk). Raises EOFError
    at the end.
    """
    sys.stdout.write(PROMPT)
    sys.stdout.flush()
    if sys.stdin is None:  # started with stdin closed
        raise EOFError
    line = getattr(sys.stdin, "buffer", sys.stdin).readline()
    if not line:
        raise EOFError
    try:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        else:  # a text stream; undecodable bytes show up as lone surrogates
            line.encode("utf-8")
    except UnicodeError:
        raise NotUTF8() from None
    return line.rstrip("\r\n")
