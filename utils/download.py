"""Download OpenAI's official GPT-2 checkpoints, resuming after dropped connections.

    python -m utils.download                  # 117M into gpt2_pretrained_models/model_117M
    python -m utils.download 345M 774M        # several sizes
    python -m utils.download 117M --model_dir my/dir --base_url http://mirror/gpt-2/models

Model names follow the original Texar example (117M, 345M, 774M, 1558M); OpenAI
has since renamed the first two 124M and 355M on its storage, and both spellings
(and the Hugging Face names gpt2, gpt2-medium, ...) are accepted.

Each file streams into `<file>.partial` next to its final name. A dropped
connection is resumed with an HTTP Range request, after an exponential backoff;
a `.partial` left by an interrupted run (Ctrl-C included) is resumed by the next
one. Only a file whose size matches what the server announced is moved into
place, so a file under its final name is always complete. A resumed request
carries `If-Range` with the ETag (or Last-Modified) of the first response,
kept in `<file>.partial.validator`: if the file changed on the server in
between, the server sends it whole and the download starts over, instead of
splicing two versions into a file of the right size.
"""
import argparse
import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Sequence

import requests
from tqdm import tqdm

from utils.errors import UserError, run_main

OPENAI_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
BASE_URL_ENV = "GPT2_DOWNLOAD_BASE_URL"  # overrides OPENAI_BASE_URL (mirrors, tests)
VALIDATOR_SUFFIX = ".validator"  # beside <file>.partial: its ETag / Last-Modified
LOCK_NAME = ".download.lock"  # in the model directory, held while downloading

MODEL_FILES = ("checkpoint", "encoder.json", "hparams.json",
               "model.ckpt.data-00000-of-00001", "model.ckpt.index",
               "model.ckpt.meta", "vocab.bpe")
DEFAULT_MODEL = "117M"

# Local name (the original example's) -> the folder name on OpenAI's storage.
REMOTE_NAMES = {"117M": "124M", "345M": "355M", "774M": "774M", "1558M": "1558M"}
_ALIASES = {
    "117m": "117M", "124m": "117M", "gpt2": "117M", "gpt2-small": "117M",
    "345m": "345M", "355m": "345M", "gpt2-medium": "345M",
    "774m": "774M", "gpt2-large": "774M",
    "1558m": "1558M", "1.5b": "1558M", "gpt2-xl": "1558M",
}

CHUNK_BYTES = 1 << 16
BACKOFF_BASE_S = 0.5   # waits 0.5, 1, 2, 4, 8 s between attempts
BACKOFF_MAX_S = 8.0
# Worth another try: the server may recover. Any other 4xx (404, 403...) will not.
_RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class _Transient(Exception):
    """A failed attempt worth retrying; the message says what happened."""


class _Fatal(Exception):
    """A failure retrying cannot fix (e.g. HTTP 404)."""


def canonical_model_name(name: str) -> str:
    """'124M', 'gpt2-small', 'gpt2' or '117M' -> '117M'; unknown names -> UserError."""
    canonical = _ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise UserError(
            f"unknown GPT-2 model '{name}': use one of 117M (124M, gpt2), "
            f"345M (355M, gpt2-medium), 774M (gpt2-large), 1558M (gpt2-xl)")
    return canonical


def default_model_dir(name: str) -> str:
    """Where the original example keeps a model: gpt2_pretrained_models/model_<NAME>."""
    return os.path.join("gpt2_pretrained_models",
                        "model_" + canonical_model_name(name))


def missing_files(model_dir: str, files: Sequence[str] = MODEL_FILES) -> List[str]:
    """The files of `files` that `model_dir` lacks (an empty file counts as missing)."""
    return [f for f in files
            if not (os.path.isfile(os.path.join(model_dir, f))
                    and os.path.getsize(os.path.join(model_dir, f)) > 0)]


def resolve_base_url(base_url: Optional[str] = None) -> str:
    """The argument, else $GPT2_DOWNLOAD_BASE_URL, else OpenAI's storage."""
    return (base_url or os.environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")


def model_file_url(name: str, filename: str, base_url: Optional[str] = None) -> str:
    return f"{resolve_base_url(base_url)}/{REMOTE_NAMES[canonical_model_name(name)]}/{filename}"


def download_model(name: str = DEFAULT_MODEL, model_dir: Optional[str] = None,
                   base_url: Optional[str] = None, files: Iterable[str] = MODEL_FILES,
                   *, retries: int = 5, timeout: float = 30, progress: bool = True,
                   sleep: Callable[[float], None] = time.sleep) -> str:
    """Download the model's files not already in `model_dir`; return `model_dir`.

    `model_dir` defaults to default_model_dir(name); `base_url` to
    $GPT2_DOWNLOAD_BASE_URL, then OPENAI_BASE_URL. `retries` counts consecutive
    attempts without progress; `sleep` is the backoff wait (tests pass a fake).
    """
    name = canonical_model_name(name)
    model_dir = model_dir or default_model_dir(name)
    todo = missing_files(model_dir, tuple(files))
    if not todo:
        return model_dir
    created = not os.path.isdir(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create model directory {model_dir} ({err.strerror}); "
                        f"pass a writable --model_dir") from err
    with _directory_lock(model_dir), requests.Session() as session:
        # Another process may have fetched some files while this one waited.
        todo = missing_files(model_dir, tuple(files))
        for filename in todo:
            url = model_file_url(name, filename, base_url)
            try:
                download_file(url, os.path.join(model_dir, filename), session=session,
                              retries=retries, timeout=timeout, progress=progress,
                              sleep=sleep)
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


def ensure_model(name_or_dir: str = DEFAULT_MODEL, **kwargs) -> str:
    """A model dir holding every file: download a named model, or complete a dir.

    A name ('117M', 'gpt2-medium', ...) goes to default_model_dir(name). A
    directory is returned as is when complete; one named model_<NAME> (the
    original example's layout) is completed by downloading; any other incomplete
    directory is a UserError naming the missing files.
    """
    try:
        name = canonical_model_name(name_or_dir)
    except UserError:
        name = None
    if name is not None and not os.path.isdir(name_or_dir):
        return download_model(name, default_model_dir(name), **kwargs)
    model_dir = name_or_dir
    missing = missing_files(model_dir)
    if not missing:
        return model_dir
    base = os.path.basename(os.path.normpath(model_dir))
    try:
        name = canonical_model_name(base[len("model_"):]) if base.startswith("model_") else None
    except UserError:
        name = None
    if name is None:
        what = "does not exist" if not os.path.isdir(model_dir) else f"lacks {', '.join(missing)}"
        raise UserError(
            f"GPT-2 model directory {model_dir} {what}: download a model with "
            f"'sh download_model.sh 117M' (or 345M, 774M, 1558M), or give a directory "
            f"holding {', '.join(MODEL_FILES)}")
    return download_model(name, model_dir, **kwargs)


def download_file(url: str, dest: str, *, session: Optional[requests.Session] = None,
                  retries: int = 5, timeout: float = 30, progress: bool = True,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Fetch `url` into `dest` via `dest.partial`, resuming and retrying; UserError on failure."""
    partial = dest + ".partial"
    filename = os.path.basename(dest)
    own_session = session is None
    session = session or requests.Session()
    failures = 0
    try:
        while True:
            before = _size(partial)
            try:
                _attempt(session, url, partial, filename, timeout, progress)
                break
            except _Fatal as err:
                raise UserError(f"could not download {filename} from {url}: {err}") from None
            except (_Transient, requests.RequestException) as err:
                reason = _describe(err, timeout)
            # Bytes kept on disk are progress: only attempts that add none count.
            failures = 0 if _size(partial) > before else failures + 1
            if failures > retries:
                raise UserError(
                    f"could not download {filename} from {url} ({reason}) after "
                    f"{retries + 1} tries without progress; check your network or proxy")
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
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


def _attempt(session, url, partial, filename, timeout, progress) -> None:
    """One request: append to `partial`, raise _Transient/_Fatal unless it is complete."""
    have = _size(partial)
    # identity: sizes and ranges must refer to the file's own bytes, not a gzip of them.
    headers = {"Accept-Encoding": "identity"}
    validator_path = partial + VALIDATOR_SUFFIX
    if have:
        headers["Range"] = f"bytes={have}-"
        try:
            with open(validator_path, encoding="utf-8") as f:
                headers["If-Range"] = f.read().strip()
        except (OSError, UnicodeDecodeError):
            pass  # an older partial: resumed on the size check alone
    with session.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            # Nothing after byte `have`: the partial is complete, or longer than the file.
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have:
                return
            os.remove(partial)
            raise _Transient(f"server rejected resuming at byte {have}; starting over")
        if resp.status_code in _RETRY_STATUSES:
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code not in (200, 206):
            raise _Fatal(f"HTTP {resp.status_code} {resp.reason}")

        if resp.status_code == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                os.remove(partial)
                raise _Transient(f"server resumed at byte {start}, not {have}; starting over")
        else:  # a full body: a fresh start, a changed file, or Range ignored
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _remove(validator_path)
            validator = _validator(resp.headers)
            if validator:
                with open(validator_path, "w", encoding="utf-8") as f:
                    f.write(validator)

        try:
            with open(partial, "ab" if have else "wb") as out, \
                    tqdm(total=total, initial=have, desc=filename, unit="B",
                         unit_scale=True, unit_divisor=1024, disable=not progress,
                         leave=True, file=sys.stderr) as bar:
                for chunk in resp.iter_content(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
        except OSError as err:
            if isinstance(err, requests.RequestException):
                raise  # a network failure (requests' errors are OSErrors too): retried
            # Disk full, read-only directory...: retrying cannot help.
            raise UserError(f"cannot write {partial}: {err.strerror or err}; free "
                            f"disk space or pass a writable --model_dir, then rerun "
                            f"to resume") from None
    size = _size(partial)
    if total is not None and size != total:
        if size > total:
            os.remove(partial)
        raise _Transient(f"connection closed after {size} of {total} bytes")


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
                        help="Where to put the files (one model only). Default: "
                             "gpt2_pretrained_models/model_<MODEL>.")
    parser.add_argument("--base_url", default=None,
                        help=f"Storage to fetch from, as <base_url>/<124M|355M|774M|1558M>/"
                             f"<file>. Default: ${BASE_URL_ENV}, else {OPENAI_BASE_URL}.")
    parser.add_argument("--retries", type=int, default=5,
                        help="Tries per file without progress, after the first.")
    parser.add_argument("--timeout", type=float, default=30,
                        help="Seconds to wait for the server before retrying.")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [canonical_model_name(m) for m in args.models]
    if args.model_dir and len(set(names)) > 1:
        raise UserError("--model_dir takes one model; download the sizes one at a time")
    if args.retries < 0 or args.timeout <= 0:
        raise UserError("--retries must be >= 0 and --timeout > 0")
    for name in dict.fromkeys(names):
        model_dir = download_model(name, args.model_dir, args.base_url,
                                   retries=args.retries, timeout=args.timeout)
        print(f"GPT-2 {name} is in {model_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
