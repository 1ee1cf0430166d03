"""A Ctrl-C at any point of a write leaves no temporary file and no half-written output.

Ctrl-C raises KeyboardInterrupt wherever Python is between two bytecodes. Each
writer below is run once for every bytecode step it takes (its own and what it
calls: contextlib, os.path, numpy), with a KeyboardInterrupt raised at that one
step, and the directory is checked after each: the old file or the complete
new one, and nothing else. (CI once saw prepare_data's Ctrl-C leave
train.npy.<pid>.<random>.tmp: the signal came between the file's creation and
the cleanup's knowing its name.)
"""
import dis
import os
import signal
import sys

import numpy as np
import pytest

from utils.atomic import atomic_write, interrupts_held
from utils.checkpoints.tf_writer import write_tf_checkpoint
from utils.data.prepare import records_file
from utils.data.split_output import RecordSpool, write_records
from utils.temp_files import remove_own_temp_files

OLD, NEW = b"old contents", b"new contents"
NOP = dis.opmap["NOP"]


@pytest.fixture(autouse=True)
def python_ctrl_c_handler():
    """Ctrl-C raising KeyboardInterrupt, as in a command, whatever handler this
    test process was started with (a worker may have been given another)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def run_interrupted_at(step, action, steps_in=None):
    """Run action() with a KeyboardInterrupt raised at its `step`-th bytecode;
    True if it completed before reaching that step. With `steps_in` (function
    names), only those functions' own bytecodes count: an interrupt inside a
    helper that only computes is the same as one at the helper's call."""
    seen = 0

    def trace(frame, event, arg):
        nonlocal seen
        if steps_in is not None and frame.f_code.co_name not in steps_in:
            return None
        frame.f_trace_opcodes = True
        if (event == "opcode" and frame.f_code.co_code[frame.f_lasti] != NOP
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            seen += 1
            if seen == step:
                raise KeyboardInterrupt  # the trace is unset: one interrupt, as one Ctrl-C
        return trace

    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    sys.settrace(trace)
    try:
        action()
    except KeyboardInterrupt:
        return False
    finally:
        sys.settrace(None)
        remove_own_temp_files()  # as run_main on the way out
        # however interrupted, the signal handlers are the ones it found
        assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    return True


def interrupt_at_every_step(action, check, steps_in=None):
    """check() after action() interrupted at each of its steps in turn; the steps."""
    step = 0
    while True:
        step += 1
        completed = run_interrupted_at(step, action, steps_in)
        check(completed)
        if completed:
            return step


def old_or_new_and_nothing_else(directory, name):
    def check(completed):
        assert os.listdir(directory) == [name]
        contents = (directory / name).read_bytes()
        assert contents == NEW if completed else contents in (OLD, NEW)
    return check


@pytest.mark.parametrize("replace", [True, False])
def test_atomic_write(tmp_path, replace):
    target = tmp_path / "out.bin"

    def write():
        if not replace and target.exists():
            target.unlink()  # replace=False publishes only where nothing is
        with atomic_write(str(target), "wb", replace=replace) as f:
            f.write(NEW)

    def check(completed):
        names = os.listdir(tmp_path)
        assert names in ([], ["out.bin"]), names
        if names:
            assert target.read_bytes() in ((NEW,) if completed else (OLD, NEW))
        target.write_bytes(OLD)

    target.write_bytes(OLD)
    assert interrupt_at_every_step(write, check) > 50


def test_records_file(tmp_path):
    target = tmp_path / "train.npy"

    def write():
        with records_file(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(NEW)

    target.write_bytes(OLD)
    assert interrupt_at_every_step(write, old_or_new_and_nothing_else(tmp_path, "train.npy")) > 20


def test_record_spool_and_write_records(tmp_path):
    target = tmp_path / "train.npy"
    records = np.arange(6, dtype=np.int32)

    def write():
        spool = None
        try:
            spool = RecordSpool(str(target), records.dtype)
            spool.append(records[:3])
            spool.append(records[3:])
            write_records(str(target), spool.records())
        finally:
            if spool is not None:
                spool.close()

    def check(completed):
        assert os.listdir(tmp_path) in ([], ["train.npy"])
        if completed:
            assert np.load(target).tolist() == records.tolist()
        elif target.exists():
            assert np.load(target).tolist() == records.tolist()
            target.unlink()

    writing = {"write", "__init__", "append", "records", "close", "write_records",
               "records_file", "create_records", "sync_records", "temp_name_beside",
               "remove_if_present", "__enter__", "__exit__"}
    assert interrupt_at_every_step(write, check, steps_in=writing) > 100


def test_tf_checkpoint(tmp_path):
    prefix = str(tmp_path / "model.ckpt")
    tensors = [("a", np.ones((2, 3), np.float32)), ("b", np.arange(4, dtype=np.int32))]

    def check(completed):
        names = sorted(os.listdir(tmp_path))
        assert names in ([], ["model.ckpt.data-00000-of-00001", "model.ckpt.index"]), names
        for name in names:
            os.remove(tmp_path / name)

    # The table's encoding and checksums only compute: their calls are the steps.
    writing = {"write_tf_checkpoint", "_replace_all", "interrupts_held", "temp_name_beside",
               "remove_if_present", "__enter__", "__exit__"}
    assert interrupt_at_every_step(lambda: write_tf_checkpoint(prefix, tensors), check,
                                   steps_in=writing) > 100


def test_interrupts_held_delivers_them_when_the_block_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after Ctrl-C")
    assert steps == ["after Ctrl-C"]  # the block ran to its end first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    previous = signal.signal(signal.SIGTERM, lambda num, frame: steps.append(num))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("after SIGTERM")
        # then to the handler in force before the block
        assert steps[1:] == ["after SIGTERM", signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
