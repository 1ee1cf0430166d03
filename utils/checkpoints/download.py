"""Download OpenAI's official GPT-2 checkpoints, resuming after dropped connections.

    python -m utils.checkpoints.download                  # 117M into gpt2_pretrained_models/model_117M
    python -m utils.checkpoints.download 345M 774M        # several sizes
    python -m utils.checkpoints.download 117M --model_dir my/dir --base_url http://mirror/gpt-2/models

Model names follow the original Texar example (117M, 345M, 774M, 1558M; OpenAI's
124M and 355M and the Hugging Face names are accepted too): see utils/checkpoints/openai_files.py,
which also says what each file must look like. This module is the HTTP side.

Each file streams into `<file>.partial` next to its final name. A dropped
connection is resumed with an HTTP Range request, after an exponential backoff;
a `.partial` left by an interrupted run (Ctrl-C included) is resumed by the next
one. A resumed request carries `If-Range` with the ETag (or Last-Modified) of
the first response, kept in `<file>.partial.validator`: if the file changed on
the server in between, the server sends it whole and the download starts over,
instead of splicing two versions into a file of the right size.

Nothing reaches its final name unless it is complete and passes its check:
- the body must be as long as the server announced; a body sent without a
  length (ended by closing the connection) is confirmed by asking for the bytes
  after it (or, from a server without Range support, by a second read of the
  same length);
- an HTML page (a captive portal, a proxy's or mirror's error page) is refused
  without touching the `.partial`;
- the content is checked (`utils.checkpoints.openai_files.check_model_file`: JSON files of
  the right shape, a parsing checkpoint index, weights as long as it says...).
  A download that fails its check is deleted and fetched once more; a second
  failure is an error. A file already on disk that fails its check is
  downloaded again; one that passes is never fetched again.

A slow mirror (one that trickles bytes or stalls) is bounded by a total time
per file: --total_timeout, or $GPT2_DOWNLOAD_TOTAL_TIMEOUT, in seconds (default
0: no limit, as the 1558M weights take hours on a slow link). When it runs out
the download stops with one line and keeps the `.partial` for the next run.
The waits between attempts start at 0.5 s and double up to 8 s;
$GPT2_DOWNLOAD_BACKOFF sets the first wait (0 retries at once).
"""
import argparse
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, Optional

from tqdm import tqdm

if TYPE_CHECKING:  # imported where a download needs it: most runs download nothing
    import requests

from utils.errors import UserError, run_main
from utils.checkpoints.openai_files import (DEFAULT_MODEL, DEFAULT_MODEL_DIR_PATTERN, MODEL_FILES,
                               REMOTE_NAMES, canonical_model_name, check_model_file,
                               checking_order, default_model_dir, file_problems,
                               looks_like_html)

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "GPT2_DOWNLOAD_BASE_URL"  # overrides OPENAI_BASE_URL (mirrors, tests)
TOTAL_TIMEOUT_ENV = "GPT2_DOWNLOAD_TOTAL_TIMEOUT"  # seconds per file; 0 or unset: no limit
BACKOFF_ENV = "GPT2_DOWNLOAD_BACKOFF"  # seconds of the first wait between attempts
VALIDATOR_SUFFIX = ".validator"  # beside <file>.partial: its ETag / Last-Modified
LOCK_NAME = ".download.lock"  # in the model directory, held while downloading

CHUNK_BYTES = 1 << 16
# Worth another try: the server may recover. Any other 4xx (404, 403...) will not.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class Backoff:
    """The wait before another attempt: base_s, 2*base_s, 4*base_s, ... at most max_s."""
    base_s: float = 0.5
    max_s: float = 8.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` attempts in a row without progress (0: after progress)."""
        return min(self.max_s, self.base_s * 2 ** max(0, failures - 1))


DEFAULT_BACKOFF = Backoff()


class _Transient(Exception):
    """A failed attempt worth retrying; the message says what happened."""


class _Unconfirmed(_Transient):
    """A body that ended without a length to check it against: maybe all, maybe cut."""

    def __init__(self, size: int):
        super().__init__(f"the server closed the connection after {size} bytes without "
                         f"giving the file's size; checking that nothing is missing")
        self.size = size


class _Fatal(Exception):
    """A failure retrying cannot fix (e.g. HTTP 404)."""


class _OutOfTime(Exception):
    """The file's total timeout ran out."""


# ---------------------------------------------------------------------------
# Settings

def resolve_base_url(base_url: Optional[str] = None) -> str:
    """The argument, else $GPT2_DOWNLOAD_BASE_URL, else OpenAI's storage."""
    return (base_url or os.environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")


def _seconds(value, what: str) -> float:
    """A finite number of seconds >= 0, or a UserError naming `what`."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds < 0:
        raise UserError(f"{what} must be a number of seconds >= 0 (got {value!r})")
    return seconds


def resolve_total_timeout(total_timeout=None) -> Optional[float]:
    """Seconds one file may take: the argument (a number or the flag's text), else
    $GPT2_DOWNLOAD_TOTAL_TIMEOUT; None for no limit (unset or 0)."""
    if total_timeout is None:
        value = os.environ.get(TOTAL_TIMEOUT_ENV, "").strip()
        if not value:
            return None
        total_timeout = _seconds(value, f"${TOTAL_TIMEOUT_ENV}")
    else:
        total_timeout = _seconds(total_timeout, "--total_timeout")
    return total_timeout or None  # 0: no limit


def default_backoff() -> Backoff:
    """DEFAULT_BACKOFF, or the first wait from $GPT2_DOWNLOAD_BACKOFF (same doubling)."""
    value = os.environ.get(BACKOFF_ENV, "").strip()
    if not value:
        return DEFAULT_BACKOFF
    base = _seconds(value, f"${BACKOFF_ENV}")
    ratio = DEFAULT_BACKOFF.max_s / DEFAULT_BACKOFF.base_s
    return Backoff(base_s=base, max_s=base * ratio)


def model_file_url(name: str, filename: str, base_url: Optional[str] = None) -> str:
    return f"{resolve_base_url(base_url)}/{REMOTE_NAMES[canonical_model_name(name)]}/{filename}"


# ---------------------------------------------------------------------------
# A model directory

def download_model(name: str = DEFAULT_MODEL, model_dir: Optional[str] = None,
                   base_url: Optional[str] = None, files: Iterable[str] = MODEL_FILES,
                   *, retries: int = 5, timeout: float = 30, progress: bool = True,
                   total_timeout: Optional[float] = None, backoff: Optional[Backoff] = None,
                   sleep: Callable[[float], None] = time.sleep) -> str:
    """Download the model's files that `model_dir` lacks or that fail their check;
    return `model_dir`.

    `model_dir` defaults to default_model_dir(name); `base_url` to
    $GPT2_DOWNLOAD_BASE_URL, then OPENAI_BASE_URL. `retries` counts consecutive
    attempts without progress; `total_timeout` bounds each file's seconds
    (None: $GPT2_DOWNLOAD_TOTAL_TIMEOUT, else no limit); `backoff` sets the
    waits between attempts (None: default_backoff()), `sleep` makes them
    (tests pass a fake).
    """
    name = canonical_model_name(name)
    model_dir = model_dir or default_model_dir(name)
    files = checking_order(files)
    if not file_problems(model_dir, files):
        return model_dir
    total_timeout = resolve_total_timeout(total_timeout)
    backoff = backoff or default_backoff()
    created = not os.path.isdir(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create model directory {model_dir} ({err.strerror}); "
                        f"pass a writable --model_dir") from err
    import requests  # here, not at the top: most runs download nothing
    with _directory_lock(model_dir), requests.Session() as session:
        for filename in files:
            # Checked now, not before the lock: another process may have fetched
            # it meanwhile, and the data file's check needs the index fetched first.
            dest = os.path.join(model_dir, filename)
            problem = check_model_file(dest, filename)
            if problem is None:
                continue
            if os.path.exists(dest):
                tqdm.write(f"{dest} {problem}; downloading it again", file=sys.stderr)
            url = model_file_url(name, filename, base_url)
            try:
                download_file(url, dest, session=session, retries=retries, timeout=timeout,
                              progress=progress, total_timeout=total_timeout,
                              backoff=backoff, sleep=sleep,
                              check=lambda path, kind=filename: check_model_file(path, kind))
            except UserError as err:
                if created and os.listdir(model_dir) == [LOCK_NAME]:
                    os.remove(os.path.join(model_dir, LOCK_NAME))
                    os.rmdir(model_dir)  # leave no empty directory behind
                raise UserError(
                    f"{err}; or download GPT-2 {name}'s files ({', '.join(MODEL_FILES)}) "
                    f"by hand into {model_dir}/ and rerun") from err
    return model_dir


@contextmanager
def _directory_lock(model_dir: str):
    """One download into `model_dir` at a time: two processes appending to the
    same .partial would corrupt it, so a second one waits for the first."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(os.path.join(model_dir, LOCK_NAME), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"waiting for another process downloading into {model_dir} ...",
                       file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download_file(url: str, dest: str, *, session: Optional["requests.Session"] = None,
                  retries: int = 5, timeout: float = 30, progress: bool = True,
                  total_timeout: Optional[float] = None, backoff: Optional[Backoff] = None,
                  sleep: Callable[[float], None] = time.sleep,
                  check: Optional[Callable[[str], Optional[str]]] = None) -> None:
    """Fetch `url` into `dest` via `dest.partial`, resuming and retrying; UserError on failure.

    `check(path)` returns what is wrong with a finished download, or None; a
    download it rejects is deleted and fetched once more before giving up.
    `total_timeout` (seconds, None: no limit) bounds the whole file, retries
    and waits included; the `.partial` is kept for the next run.
    """
    import requests
    partial = dest + ".partial"
    filename = os.path.basename(dest)
    backoff = backoff or default_backoff()
    own_session = session is None
    session = session or requests.Session()
    deadline = None if total_timeout is None else time.monotonic() + total_timeout
    failures = 0
    rejected = 0     # finished downloads that failed `check`
    unconfirmed = None  # size of the last body that ended without a known length
    try:
        while True:
            before = _size(partial)
            try:
                _attempt(session, url, partial, filename, _attempt_timeout(timeout, deadline),
                         progress, deadline, unconfirmed)
                problem = check(partial) if check else None
                if problem is None:
                    break
                rejected += 1
                _reject(partial, filename, url, problem, last_try=rejected > 1)
                unconfirmed = None
                continue
            except _Fatal as err:
                raise UserError(f"could not download {filename} from {url}: {err}") from None
            except _OutOfTime:
                raise _out_of_time(filename, url, partial, total_timeout) from None
            except _Unconfirmed as err:
                unconfirmed, reason = err.size, str(err)
            except (_Transient, requests.RequestException) as err:
                reason = _describe(err, timeout)
            # Bytes kept on disk are progress: only attempts that add none count.
            failures = 0 if _size(partial) > before else failures + 1
            if failures > retries:
                raise UserError(
                    f"could not download {filename} from {url} ({reason}) after "
                    f"{retries + 1} tries without progress; check your network or proxy")
            delay = backoff.delay(failures)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise _out_of_time(filename, url, partial, total_timeout)
            tqdm.write(f"{filename}: {reason}; retrying in {delay:g} s", file=sys.stderr)
            sleep(delay)
    except KeyboardInterrupt:
        if os.path.exists(partial):
            tqdm.write(f"interrupted: kept {partial} ({_size(partial)} bytes); "
                       f"run the download again to resume", file=sys.stderr)
        raise
    finally:
        if own_session:
            session.close()
    os.replace(partial, dest)
    _remove(partial + VALIDATOR_SUFFIX)


def _reject(partial, filename, url, problem, last_try) -> None:
    """Delete a finished download that failed its check: nothing of it is trusted
    (not even as a start to resume from). UserError when it was the last try."""
    _remove(partial)
    _remove(partial + VALIDATOR_SUFFIX)
    if last_try:
        raise UserError(f"{filename} from {url} failed its check twice (it {problem}); the "
                        f"server sends a broken file: try another --base_url")
    tqdm.write(f"{filename}: the download {problem}; downloading it again", file=sys.stderr)


def _attempt_timeout(timeout: float, deadline: Optional[float]) -> float:
    """The wait for one answer or read: `timeout`, but never past the file's deadline."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise _OutOfTime()
    return min(timeout, left)


def _out_of_time(filename, url, partial, total_timeout) -> UserError:
    kept = (f"kept {_size(partial)} bytes in {partial}: rerun to resume"
            if _size(partial) else "received nothing")
    return UserError(
        f"downloading {filename} from {url} took longer than the total timeout of "
        f"{total_timeout:g} s (--total_timeout or ${TOTAL_TIMEOUT_ENV}); {kept}, raise "
        f"the limit, or try another --base_url")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _validator(headers) -> Optional[str]:
    """What identifies this version of the file for If-Range: a strong ETag,
    else Last-Modified (weak ETags are not allowed in If-Range)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _request_headers(partial: str, have: int) -> Dict[str, str]:
    # identity: sizes and ranges must refer to the file's own bytes, not a gzip of them.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        try:
            with open(partial + VALIDATOR_SUFFIX, encoding="utf-8") as f:
                headers["If-Range"] = f.read().strip()
        except (OSError, UnicodeDecodeError):
            pass  # an older partial: resumed on the size check alone
    return headers


def _attempt(session, url, partial, filename, timeout, progress, deadline,
             unconfirmed) -> None:
    """One request: append to `partial`; raise _Transient, _Fatal or _OutOfTime
    unless it is complete. `unconfirmed`: the size of the previous body that
    ended without a length, which this answer may confirm."""
    have = _size(partial)
    with session.get(url, headers=_request_headers(partial, have), stream=True,
                     timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            # Nothing after byte `have`: the partial is complete, or longer than the file.
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have or (total is None and have == unconfirmed):
                return
            os.remove(partial)
            raise _Transient(f"server rejected resuming at byte {have}; starting over")
        if resp.status_code in _RETRY_STATUSES:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise _Fatal(f"HTTP {resp.status_code} {resp.reason}")
        content_type = resp.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise _Fatal(_html_page(content_type))

        body = _read_body(resp, deadline)
        if resp.status_code == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                os.remove(partial)
                raise _Transient(f"server resumed at byte {start}, not {have}; starting over")
            first = b""
        else:  # a full body: a fresh start, a changed file, or Range ignored
            first = next(body, b"")
            if looks_like_html(first):  # before the partial is touched
                raise _Fatal(_html_page("a page starting " + repr(first[:15].decode(
                    "ascii", "replace"))))
            have = 0
            total = _content_length(resp)
            _save_validator(partial, resp.headers)
        _write_body(partial, have, first, body, total, filename, progress)
    size = _size(partial)
    if total is not None:
        if size != total:
            if size > total:
                os.remove(partial)
            raise _Transient(f"connection closed after {size} of {total} bytes")
        return
    if _close_delimited(resp) and not (resp.status_code == 200 and size == unconfirmed):
        # Nothing tells a complete body from a cut one: ask for the bytes after
        # it (416: that was all), or, without Range support, read it again.
        raise _Unconfirmed(size)


def _html_page(what: str) -> str:
    return (f"the server sent an HTML page ({what}), not the file: a captive portal, "
            f"proxy or error page? log in to the network, or check --base_url / "
            f"${BASE_URL_ENV}")


def _content_length(resp) -> Optional[int]:
    length = resp.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def _close_delimited(resp) -> bool:
    """Whether the body's end was only the connection closing (no length, not chunked;
    a chunked body has an explicit last chunk, so it is known to be whole)."""
    return (_content_length(resp) is None and
            "chunked" not in resp.headers.get("Transfer-Encoding", "").lower())


def _save_validator(partial: str, headers) -> None:
    validator_path = partial + VALIDATOR_SUFFIX
    _remove(validator_path)
    validator = _validator(headers)
    if validator:
        with open(validator_path, "w", encoding="utf-8") as f:
            f.write(validator)


def _write_body(partial, have, first, body, total, filename, progress) -> None:
    try:
        with open(partial, "ab" if have else "wb") as out, \
                tqdm(total=total, initial=have, desc=filename, unit="B",
                     unit_scale=True, unit_divisor=1024, disable=not progress,
                     leave=True, file=sys.stderr) as bar:
            for chunk in _prepend(first, body):
                out.write(chunk)
                bar.update(len(chunk))
    except OSError as err:
        import requests
        if isinstance(err, requests.RequestException):
            raise  # a network failure (requests' errors are OSErrors too): retried
        # Disk full, read-only directory...: retrying cannot help.
        raise UserError(f"cannot write {partial}: {err.strerror or err}; free "
                        f"disk space or pass a writable --model_dir, then rerun "
                        f"to resume") from None


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _read_body(resp, deadline: Optional[float]) -> Iterator[bytes]:
    """The body in pieces as they arrive, until it ends; _OutOfTime past `deadline`.

    read1 returns whatever one socket read brings, so a server trickling a byte
    at a time still lets the deadline be checked (a fixed-size read would wait
    for the whole chunk); a stalled read ends after the request's timeout.
    urllib3's errors become requests' (retried like any network failure).
    """
    import requests
    import urllib3
    raw = resp.raw
    read = raw.read1 if hasattr(raw, "read1") else raw.read  # read1: urllib3 2+
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            raise _OutOfTime()
        try:
            chunk = read(CHUNK_BYTES, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as err:
            raise requests.exceptions.ReadTimeout(err) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise requests.exceptions.ChunkedEncodingError(err) from None
        if not chunk:
            return
        yield chunk


def _parse_content_range(value: str):
    """'bytes 100-999/1000' -> (100, 1000); total None for '/*'."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not match:
        raise _Transient(f"unusable Content-Range '{value}'")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _content_range_total(value: str) -> Optional[int]:
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _describe(err: Exception, timeout: float) -> str:
    """A short reason for a failed attempt (requests' own messages run to lines)."""
    import requests
    if isinstance(err, _Transient):
        return str(err)
    if isinstance(err, requests.Timeout):
        return f"no answer within {timeout:g} s"
    text = str(err)
    for pattern in (r"\[Errno -?\d+\] [^'\")\]]+",   # e.g. Connection refused
                    r"Failed to resolve '[^']+'",
                    r"Connection broken: [A-Za-z]+"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return f"{type(err).__name__}: {text[:200]}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[DEFAULT_MODEL], metavar="MODEL",
                        help="117M (default; also 124M, gpt2), 345M (355M, gpt2-medium), "
                             "774M (gpt2-large), 1558M (gpt2-xl).")
    parser.add_argument("--model_dir", default=None,
                        help=f"Where to put the files (one model only). Default: "
                             f"{DEFAULT_MODEL_DIR_PATTERN}.")
    parser.add_argument("--base_url", default=None,
                        help=f"Storage to fetch from, as <base_url>/<124M|355M|774M|1558M>/"
                             f"<file>. Default: ${BASE_URL_ENV}, else {OPENAI_BASE_URL}.")
    parser.add_argument("--retries", type=int, default=5,
                        help="Tries per file without progress, after the first.")
    parser.add_argument("--timeout", type=float, default=30,
                        help="Seconds to wait for the server before retrying.")
    parser.add_argument("--total_timeout", default=None, metavar="SECONDS",
                        help=f"Most seconds one file may take, retries included; when "
                             f"they run out the download stops and keeps its .partial "
                             f"for the next run. Default: ${TOTAL_TIMEOUT_ENV}, else 0 "
                             f"(no limit).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [canonical_model_name(m) for m in args.models]
    if args.model_dir and len(set(names)) > 1:
        raise UserError("--model_dir takes one model; download the sizes one at a time")
    if args.retries < 0 or not args.timeout > 0 or not math.isfinite(args.timeout):
        raise UserError("--retries must be >= 0 and --timeout a number of seconds > 0")
    total_timeout = resolve_total_timeout(args.total_timeout)  # the flag, else the env
    backoff = default_backoff()  # a bad $GPT2_DOWNLOAD_BACKOFF fails before any request
    for name in dict.fromkeys(names):
        model_dir = download_model(name, args.model_dir, args.base_url,
                                   retries=args.retries, timeout=args.timeout,
                                   total_timeout=total_timeout or 0,  # 0: no limit
                                   backoff=backoff)
        print(f"GPT-2 {name} is in {model_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
