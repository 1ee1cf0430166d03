"""The compiled batch-1 step's kernels (utils/decoding/compiled_step.py), built
ahead of time once and stored, so that later processes load them in
milliseconds instead of importing and running torch's compiler (seconds).

Building exports each kernel (torch.export) and compiles it with AOTInductor
into one shared library; that needs a C++ compiler and Python's headers and
takes tens of seconds. Loading opens the libraries through torch's
AOTInductor runner, without importing the compiler.

Each build lives in a directory named by a hash of everything the code
depends on (`_store_key`): this store's format, torch's version and build,
the CPU's model and instruction sets, the number of threads the kernels were
built for, the kernels' source, and the signature of their arguments (shapes,
strides, dtypes, layer-norm epsilon). Another torch, CPU or
model shape gets another directory: a build is never used for anything but
what it was built for.

A stored kernel is code this process runs, so the store is private: it lives
in the user's cache ($GPT2_TEXAR_CACHE_DIR, else $XDG_CACHE_HOME/gpt2-texar,
else ~/.cache/gpt2-texar), its directories are created for the user alone
(0700), its libraries are written whole (temporary file + rename) and
readable by the user alone, and a directory or library there that is not
the user's own, or that others may write, is refused, never loaded.
"""
import functools
import hashlib
import os
import platform
import shutil
import stat
import tempfile
import warnings
import zipfile
from typing import Callable, Dict, Optional

import torch

from utils.atomic import atomic_write
from utils.decoding import compiled_step
from utils.device import cpu_identity

STORE_FORMAT = 1
KERNELS_FOLDER = "step_kernels"
CACHE_ENV = "GPT2_TEXAR_CACHE_DIR"


class StoreProblem(Exception):
    """The store cannot be used: a directory or library others could have
    written, or a directory that cannot be created."""


def cache_root() -> str:
    """The project's cache directory (see the module's docstring)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "gpt2-texar")


@functools.lru_cache(maxsize=None)
def _kernels_source_hash() -> str:
    with open(compiled_step.__file__, "rb") as source:
        return hashlib.sha256(source.read()).hexdigest()


def _store_key(kernel_signature: tuple) -> str:
    facts = (STORE_FORMAT, torch.__version__, torch.version.git_version,
             platform.machine(), cpu_identity(), torch.get_num_threads(),
             _kernels_source_hash(), kernel_signature)
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:32]


def _store_dirs(kernel_signature: tuple):
    """The store's directories from the cache root down to this build's."""
    root = cache_root()
    kernels = os.path.join(root, KERNELS_FOLDER)
    return root, kernels, os.path.join(kernels, _store_key(kernel_signature))


def _library(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.so")


def _check_private(path: str, want_dir: bool) -> None:
    info = os.lstat(path)
    kind_ok = stat.S_ISDIR(info.st_mode) if want_dir else stat.S_ISREG(info.st_mode)
    if not kind_ok or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise StoreProblem(
            f"{path} is not a {'directory' if want_dir else 'file'} of yours that only "
            f"you can write: the compiled step's kernel store must be private (remove "
            f"that path, or point {CACHE_ENV} at a directory of your own)")


def stored_kernels_dir(kernel_signature: tuple) -> Optional[str]:
    """The directory holding a complete build for this signature, checked
    private; None when there is none (StoreProblem when one is there but
    could have been written by someone else)."""
    dirs = _store_dirs(kernel_signature)
    if not all(os.path.isfile(_library(dirs[-1], name))
               for name in compiled_step.KERNEL_NAMES):
        return None
    for directory in dirs:
        _check_private(directory, want_dir=True)
    for name in compiled_step.KERNEL_NAMES:
        _check_private(_library(dirs[-1], name), want_dir=False)
    return dirs[-1]


class StoredKernel:
    """One stored kernel, callable as the function it was compiled from."""

    def __init__(self, path: str):
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(path, 1)

    def __call__(self, *inputs: torch.Tensor):
        outputs = self._runner.run(list(inputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def load(kernel_signature: tuple) -> Optional[Dict[str, Callable]]:
    """The stored kernels for this signature, or None when none are stored."""
    directory = stored_kernels_dir(kernel_signature)
    if directory is None:
        return None
    return {name: StoredKernel(_library(directory, name))
            for name in compiled_step.KERNEL_NAMES}


def _private_dirs(kernel_signature: tuple) -> str:
    """Create the store's directories as needed (for the user alone), check
    them, and return this build's."""
    dirs = _store_dirs(kernel_signature)
    try:
        os.makedirs(os.path.dirname(dirs[0]), exist_ok=True)
        for directory in dirs:
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            _check_private(directory, want_dir=True)
    except OSError as err:
        raise StoreProblem(f"cannot create the compiled step's kernel store "
                           f"{err.filename or dirs[0]} ({err.strerror}): point "
                           f"{CACHE_ENV} at a directory you can write") from None
    return dirs[-1]


class _AsModule(torch.nn.Module):
    """A kernel function as the module torch.export takes."""

    def __init__(self, function: Callable):
        super().__init__()
        self.function = function

    def forward(self, *inputs):
        return self.function(*inputs)


def _compile_library(function: Callable, arguments: tuple, path: str) -> None:
    """Compile `function` for `arguments` with AOTInductor and write its
    shared library to `path` (whole, readable by the user alone)."""
    from torch._inductor import aoti_compile_and_package  # the compiler: only here

    with warnings.catch_warnings(), \
            tempfile.TemporaryDirectory(prefix="gpt2_kernel_") as scratch:
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations
        exported = torch.export.export(_AsModule(function), arguments)
        package = aoti_compile_and_package(exported,
                                           package_path=os.path.join(scratch, "kernel.pt2"))
        with zipfile.ZipFile(package) as archive:
            libraries = [n for n in archive.namelist() if n.endswith(".so")]
            if len(libraries) != 1:
                raise RuntimeError(f"AOTInductor's package held {len(libraries)} "
                                   f"libraries, not one")
            with archive.open(libraries[0]) as library, atomic_write(path) as out:
                os.fchmod(out.fileno(), 0o600)
                shutil.copyfileobj(library, out)


def build(kernel_signature: tuple, functions: Dict[str, Callable],
          arguments: Dict[str, tuple]) -> str:
    """Compile and store the kernels `functions` for `arguments` (which must
    match `kernel_signature`), skipping any already stored; the build's
    directory."""
    directory = _private_dirs(kernel_signature)
    for name in compiled_step.KERNEL_NAMES:
        path = _library(directory, name)
        if not os.path.exists(path):  # another process may have stored it
            _compile_library(functions[name], arguments[name], path)
    return directory
