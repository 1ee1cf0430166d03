"""prepare_data.py: text lines -> <split>.npy records, streamed, atomic, with clear errors."""
import builtins
import errno
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import prepare_data
from test_text_lines import LINE_BREAKS, random_text
from utils import atomic
from utils.data import records as data_utils
from utils.data import prepare as prepare_utils
from utils.data import text_lines
from utils.data.records import PreparedSplit
from utils.errors import UserError
from utils.processor import EOS_ID, get_encoder
import script_server
from user_files import signals_as_from_a_terminal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# OpenAI's GPT-2 ids for "Hello world" (also in tests/fixtures/tf_gpt2/README.md).
HELLO_WORLD_IDS = [15496, 995]


def write(path, text, mode="w"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        f.write(text)


def prepare(*args):
    return prepare_data.main(["--quiet", *map(str, args)])


def records(path):
    return np.load(path, mmap_mode="r", allow_pickle=False)


def test_each_line_becomes_eos_bpe_eos_padded(tmp_path, capsys):
    write(tmp_path / "train.txt", "Hello world\n\n   \nThe cat sat on the mat.\r\n")
    write(tmp_path / "dev.txt", "\ufeffHello world\n")
    assert prepare("--data_dir", tmp_path, "--max_seq_length", 16) == 0
    out = capsys.readouterr().out
    assert "train: 2 examples" in out and "2 empty lines skipped" in out
    assert not (tmp_path / "test.npy").exists()  # no test.txt, no test split

    train = records(tmp_path / "train.npy")
    assert train.dtype.names == ("length", "text_ids")
    assert train["text_ids"].shape == (2, 16)
    enc = get_encoder()
    expected = [[EOS_ID] + HELLO_WORLD_IDS + [EOS_ID],
                [EOS_ID] + enc.encode("The cat sat on the mat.") + [EOS_ID]]
    for row, ids in zip(train, expected):
        assert row["length"] == len(ids)
        assert row["text_ids"].tolist() == ids + [EOS_ID] * (16 - len(ids))
    # A byte-order mark at the start of a file is not text.
    dev = records(tmp_path / "dev.npy")
    assert dev["text_ids"][0, :4].tolist() == [EOS_ID] + HELLO_WORLD_IDS + [EOS_ID]


def test_long_lines_are_cut_keeping_both_special_tokens(tmp_path, capsys):
    line = "one two three four five six seven"
    write(tmp_path / "train.txt", f"{line}\nHello world\n")
    prepare("--data_dir", tmp_path, "--max_seq_length", 5)
    assert "1 truncated to 5" in capsys.readouterr().out
    rec = records(tmp_path / "train.npy")
    first = [EOS_ID] + get_encoder().encode(line)[:3] + [EOS_ID]
    assert rec["length"].tolist() == [5, 4]
    assert rec["text_ids"][0].tolist() == first


def test_output_dir_and_the_original_alias(tmp_path):
    write(tmp_path / "dev.txt", "Hello world\n")
    prepare("--data_dir", tmp_path, "--output_dir", tmp_path / "a")
    prepare("--data_dir", tmp_path, "--tfrecord_output_dir", tmp_path / "b")
    a, b = (tmp_path / d / "dev.npy" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == ["dev.npy", "prepared.json"]  # no temp files


def test_vocabulary_from_pretrain_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        src = os.path.join(REPO_ROOT, "utils", "gpt2_vocab", name)
        (model_dir / name).write_bytes(open(src, "rb").read())
    write(tmp_path / "train.txt", "Hello world\n")
    prepare("--data_dir", tmp_path, "--pretrain_model_dir", model_dir)
    assert records(tmp_path / "train.npy")["text_ids"][0, 1:3].tolist() == HELLO_WORLD_IDS


def test_process_pool_gives_the_same_file(tmp_path, monkeypatch):
    lines = [f"Line {i}: the river runs {'far ' * (i % 7)}past the mill." for i in range(500)]
    write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    prepare("--data_dir", tmp_path, "--max_seq_length", 12, "--num_workers", 1)
    single = (tmp_path / "train.npy").read_bytes()
    # Small chunks and no minimum: the pool path, with chunks in flight.
    monkeypatch.setattr(prepare_utils, "CHUNK_LINES", 7)
    monkeypatch.setattr(prepare_utils, "MIN_LINES_FOR_POOL", 0)
    prepare("--data_dir", tmp_path, "--max_seq_length", 12, "--num_workers", 2)
    assert (tmp_path / "train.npy").read_bytes() == single


def test_prepared_split_batches_pad_to_the_longest_in_the_batch(tmp_path):
    write(tmp_path / "train.txt", "Hello world\nThe cat sat on the mat.\nHi\n")
    prepare("--data_dir", tmp_path, "--max_seq_length", 64)
    split = PreparedSplit(str(tmp_path / "train.npy"))
    assert len(split) == 3 and split.max_seq_length == 64
    ids, lengths = split.batch([0, 2], pad_id=-1)
    assert ids.shape == (2, int(lengths.max()))  # not 64
    assert ids[0].tolist() == [EOS_ID] + HELLO_WORLD_IDS + [EOS_ID]
    assert (ids[1, int(lengths[1]):] == -1).all()
    assert split.num_targets == int((split.lengths - 1).sum())
    order = [i for batch in split.batches_by_length(2) for i in batch]
    assert sorted(order) == [0, 1, 2]


# ------------------------------------------------------------------ bad input

def test_no_split_files_is_an_error(tmp_path):
    write(tmp_path / "other.txt", "x\n")
    with pytest.raises(UserError, match="none of train.txt, dev.txt, test.txt"):
        prepare("--data_dir", tmp_path)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        prepare("--data_dir", tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_file_is_an_error(tmp_path, content):
    write(tmp_path / "train.txt", content)
    with pytest.raises(UserError, match="train.txt has no non-empty lines"):
        prepare("--data_dir", tmp_path)
    assert not (tmp_path / "train.npy").exists()


def test_non_utf8_names_file_and_line_and_keeps_the_old_output(tmp_path):
    write(tmp_path / "train.txt", "Hello world\n")
    prepare("--data_dir", tmp_path)
    before = (tmp_path / "train.npy").read_bytes()
    write(tmp_path / "train.txt", "fine\nalso fine\ncaf\xe9 latin-1\n".encode("latin-1"), "wb")
    with pytest.raises(UserError) as err:
        prepare("--data_dir", tmp_path)
    message = str(err.value)
    assert "train.txt line 3 is not valid UTF-8" in message and "0xe9" in message
    assert (tmp_path / "train.npy").read_bytes() == before  # untouched
    assert sorted(os.listdir(tmp_path)) == ["prepared.json", "train.npy", "train.txt"]


@pytest.mark.parametrize("length", [2, 0, -5])
def test_max_seq_length_below_3_is_an_error(tmp_path, length):
    write(tmp_path / "train.txt", "Hello world\n")
    with pytest.raises(UserError, match="at least 3"):
        prepare("--data_dir", tmp_path, "--max_seq_length", length)


def test_missing_pretrain_model_dir_is_an_error(tmp_path):
    write(tmp_path / "train.txt", "Hello world\n")
    with pytest.raises(UserError, match="does not exist"):
        prepare("--data_dir", tmp_path, "--pretrain_model_dir", tmp_path / "nope")


def test_damaged_prepared_file_is_an_error(tmp_path):
    np.save(tmp_path / "train.npy", np.arange(10), allow_pickle=False)
    with pytest.raises(UserError, match="not a prepared data file"):
        PreparedSplit(str(tmp_path / "train.npy"))
    (tmp_path / "dev.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="not a prepared data file"):
        PreparedSplit(str(tmp_path / "dev.npy"))


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    write(tmp_path / "test.txt", b"\xff\xfe\n", "wb")
    proc = script_server.run([sys.executable, "prepare_data.py", "--data_dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "test.txt line 1" in lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("length", [65537, 10 ** 11])
def test_max_seq_length_above_65536_is_an_error(tmp_path, length):
    write(tmp_path / "train.txt", "Hello world\n")
    with pytest.raises(UserError, match=f"--max_seq_length {length} is too large: use 3 to 65536"):
        prepare("--data_dir", tmp_path, "--max_seq_length", length)
    data_utils.check_max_seq_length(65536)  # the bound itself is fine


@pytest.mark.parametrize("dev", ["", b"caf\xe9\n"])
def test_a_bad_later_split_changes_nothing(tmp_path, dev):
    write(tmp_path / "train.txt", "Hello world\n")
    write(tmp_path / "dev.txt", "Hello world\n")
    prepare("--data_dir", tmp_path, "--max_seq_length", 16)
    before = {name: (tmp_path / name).read_bytes() for name in ("train.npy", "dev.npy")}
    write(tmp_path / "dev.txt", dev, "wb" if isinstance(dev, bytes) else "w")
    with pytest.raises(UserError, match="dev.txt"):
        prepare("--data_dir", tmp_path, "--max_seq_length", 32)
    # train.txt is fine, but train.npy is not rewritten at the new length alone.
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


# --------------------------------------------------------- the output directory

def _no_scan(*args, **kwargs):
    raise AssertionError("a text file was read before the output directory was checked")


@pytest.mark.parametrize("where", ["file", "under_file", "empty"])
def test_unusable_output_dir_is_an_error_before_any_work(tmp_path, monkeypatch, where):
    write(tmp_path / "train.txt", "Hello world\n")
    write(tmp_path / "afile", "x")
    output_dir = {"file": tmp_path / "afile", "under_file": tmp_path / "afile" / "sub",
                  "empty": ""}[where]
    monkeypatch.setattr(text_lines, "scan_text_file", _no_scan)
    message = {"file": "is a file, not a directory", "under_file": "cannot write to "
               "--output_dir", "empty": "--output_dir is empty"}[where]
    with pytest.raises(UserError, match=message):
        prepare("--data_dir", tmp_path, "--output_dir", output_dir)
    assert not (tmp_path / "train.npy").exists()


def test_read_only_output_dir_is_an_error(tmp_path, monkeypatch):
    write(tmp_path / "train.txt", "Hello world\n")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):  # root: permissions are not enforced; pretend
            def read_only_open(path, *args, **kwargs):
                if os.path.dirname(os.path.abspath(path)) == str(out):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return builtins.open(path, *args, **kwargs)
            monkeypatch.setattr(atomic, "open", read_only_open, raising=False)
        monkeypatch.setattr(text_lines, "scan_text_file", _no_scan)
        with pytest.raises(UserError, match=f"cannot write to --output_dir {out} "
                                            f"\\(Permission denied\\)"):
            prepare("--data_dir", tmp_path, "--output_dir", out)
    finally:
        out.chmod(0o755)


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate")
def test_full_disk_is_an_error_and_keeps_the_old_output(tmp_path, monkeypatch):
    write(tmp_path / "train.txt", "Hello world\n")
    prepare("--data_dir", tmp_path)
    before = (tmp_path / "train.npy").read_bytes()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=f"no space left in {tmp_path} to write train.npy"):
        prepare("--data_dir", tmp_path)
    assert (tmp_path / "train.npy").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["prepared.json", "train.npy",
                                            "train.txt"]  # no temporary file


def test_temporary_files_of_killed_runs_are_removed(tmp_path):
    write(tmp_path / "train.txt", "Hello world\n")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    # Named as utils.atomic names temporary files: <output>.<pid>.<random>.tmp
    stale = [f"train.npy.{dead}.k2j4_x9q.tmp", f"test.npy.{dead}.ab12cd34.tmp"]
    kept = [f"dev.npy.{os.getppid()}.k2j4_x9q.tmp",  # a run still going on
            f"train.npy.{dead}.ab.tmp.bak", "notes.tmp",  # not ours
            "train.npy.old.tmp", f"other.npy.{dead}.ab.tmp"]  # no pid; not an output
    for name in stale + kept:
        write(tmp_path / name, "x")
    prepare("--data_dir", tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["prepared.json", "train.npy",
                                                          "train.txt"])


# ------------------------------------------------------------------ Ctrl-C

def _encoding_started(out, first_chunk_done):
    """Whether train.npy's temporary file exists (and holds a first encoded chunk)."""
    for tmp in glob.glob(str(out / "train.npy.*.tmp")):
        if not first_chunk_done:
            return True
        try:
            return np.load(tmp, mmap_mode="r")["length"][0] > 0
        except (OSError, ValueError, EOFError):  # its header is not written yet
            pass
    return False


def _stop_a_run(tmp_path, when, send, num_workers=2):
    """Run prepare_data.py on a large train.txt and stop it with `send(pid)`.

    Returns (exit code, stderr, output directory). The run has its own
    process group, as in a terminal, so a signal can go to it whole.
    """
    words = "the river runs far past an old mill and a stone bridge under quiet sky".split()
    with open(tmp_path / "train.txt", "w", encoding="utf-8") as f:
        for i in range(300_000):
            f.write(" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12)) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "prepare_data.py", "--data_dir", str(tmp_path),
                             "--output_dir", str(out), "--num_workers", str(num_workers)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=signals_as_from_a_terminal)
    try:
        while not _encoding_started(out, when == "encoding") and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        send(proc.pid)
        _, stderr = proc.communicate(timeout=60)  # a guard against the old hang
        # The workers were wound down before the run exited: none is left.
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
    finally:
        try:  # whatever is left of the group, a stray worker included
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    return proc.returncode, stderr, out


# "starting": while the worker pool starts; "encoding": while workers encode.
@pytest.mark.parametrize("when", ["starting", "encoding"])
def test_ctrl_c_with_the_process_pool_exits_cleanly(tmp_path, when):
    code, stderr, out = _stop_a_run(tmp_path, when,
                                    lambda pid: os.killpg(pid, signal.SIGINT))
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted: train.npy not written" in stderr
    assert os.listdir(out) == []  # no temporary file, no half-written split


# SIGTERM to the run alone (kill PID) or to its whole group (a service
# manager, a container stop), with and without the worker pool.
@pytest.mark.parametrize("when, to, num_workers", [
    ("encoding", "run", 2), ("encoding", "group", 2), ("starting", "group", 2),
    ("encoding", "run", 1)])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, when, to, num_workers):
    kill = {"run": lambda pid: os.kill(pid, signal.SIGTERM),
            "group": lambda pid: os.killpg(pid, signal.SIGTERM)}[to]
    code, stderr, out = _stop_a_run(tmp_path, when, kill, num_workers)
    assert code == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert lines[-2:] == ["interrupted: train.npy not written", "terminated"], stderr
    assert os.listdir(out) == []  # no temporary file, no half-written split


# ------------------------------------------------------------ line endings

# LINE_BREAKS: every line boundary of str.splitlines, which prepare_data follows.

def test_cr_only_line_endings_give_one_example_per_line(tmp_path, capsys):
    lines = [f"Line {i} of an old Mac file." for i in range(152)]
    # As bytes, so the file holds exactly these line ends on any platform.
    write(tmp_path / "train.txt", ("\r".join(lines) + "\r").encode("utf-8"), "wb")
    assert prepare("--data_dir", tmp_path, "--max_seq_length", 16) == 0
    assert "train: 152 examples" in capsys.readouterr().out
    rec = records(tmp_path / "train.npy")
    enc = get_encoder()
    assert [row["text_ids"][1:row["length"] - 1].tolist() for row in rec] == \
        [enc.encode(line) for line in lines]


def test_every_splitlines_boundary_ends_a_line(tmp_path, capsys):
    text = "".join(f"line {i}{brk}" for i, brk in enumerate(LINE_BREAKS)) + "last"
    write(tmp_path / "train.txt", text.encode("utf-8"), "wb")
    assert prepare("--data_dir", tmp_path, "--max_seq_length", 16) == 0
    assert f"train: {len(LINE_BREAKS) + 1} examples, " in capsys.readouterr().out
    rec = records(tmp_path / "train.npy")
    enc = get_encoder()
    assert [row["text_ids"][1:row["length"] - 1].tolist() for row in rec] == \
        [enc.encode(line) for line in text.splitlines()]


def test_non_utf8_line_number_counts_every_kind_of_line_end(tmp_path):
    write(tmp_path / "train.txt", "one\rtwo\u2028three\r\nfour\x85caf\xe9\n".encode("utf-8")
          .replace(b"caf\xc3\xa9", b"caf\xe9"), "wb")
    proc = script_server.run([sys.executable, "prepare_data.py", "--data_dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.txt line 5 is not valid UTF-8 (byte " \
        "0xe9 at byte 4 of the line)" in last
    assert sorted(os.listdir(tmp_path)) == ["train.txt"]


# ------------------------------------------------------------ long lines

def test_a_long_line_is_cut_where_its_first_tokens_are_certain():
    # GPT-2 tokens of the cut start are the first tokens of the whole text,
    # whatever the text around the cut: contractions, runs of spaces of any
    # kind, letters, digits, punctuation.
    enc = get_encoder()
    longest = max(len(token) for token in enc.encoder)
    rng = __import__("random").Random(0)
    alphabet = list("ab é中 \t.,'!-") + ["'s", "'ll", "'re", "'d", "12", "\u3000", "  ",
                                        "x" * 30, "\u00a0", "\u2003", "\x1f", " '"]
    certain = 0
    for _ in range(4000):
        whole = random_text(rng, alphabet, 80) + "."
        kept = whole[:rng.randint(1, len(whole))]
        cut = prepare_utils.LongLineCut(tokens=rng.randint(1, 12),
                                     token_bytes=rng.choice([1, longest]))
        start = cut.cut(kept)
        assert whole.startswith(start)
        if start == kept:
            continue  # no certain cut in so short a text: encoded as kept
        certain += 1
        ids = enc.encode(start)
        assert enc.encode(whole)[:len(ids)] == ids, (whole, kept, start)
        if cut.token_bytes == longest:
            assert len(ids) >= cut.tokens, (whole, kept, start)
    assert certain > 1000  # the property was checked, not skipped


def test_long_lines_among_short_ones(tmp_path, monkeypatch, capsys):
    # Lines longer than a read block, and longer than what is kept of them.
    monkeypatch.setattr(text_lines, "READ_BLOCK", 64)
    monkeypatch.setattr(prepare_utils, "LONG_PIECE_CHARS", 50)
    words = "the river runs far past an old mill, and a stone bridge's arch".split()
    long_line = " ".join(words[i % len(words)] for i in range(3000))
    lines = ["Hello world", "  " + long_line + " \t", "", "The cat sat.", long_line[:100]]
    write(tmp_path / "train.txt", "\n".join(lines) + "\n")
    assert prepare("--data_dir", tmp_path, "--max_seq_length", 12) == 0
    assert "4 examples" in capsys.readouterr().out
    enc = get_encoder()
    rec = records(tmp_path / "train.npy")
    for row, line in zip(rec, [lines[0], long_line, lines[3], lines[4]]):
        expected = [EOS_ID] + enc.encode(line.strip())[:10] + [EOS_ID]
        assert row["text_ids"][:row["length"]].tolist() == expected


def _peak_memory_mb(data_dir, out_dir):
    """Peak resident memory (MB) of prepare_data.py run in a fresh process."""
    script = ("import atexit, resource, runpy, sys\n"
              "atexit.register(lambda: print('maxrss', resource.getrusage("
              "resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n"
              f"sys.argv = ['prepare_data.py', '--quiet', '--data_dir', {str(data_dir)!r}, "
              f"'--output_dir', {str(out_dir)!r}, '--max_seq_length', '64']\n"
              "runpy.run_path('prepare_data.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return int(proc.stderr.split("maxrss")[-1]) / 1024  # Linux reports KB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KB on Linux")
def test_a_giant_single_line_is_read_in_bounded_memory(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    sentence = "The river runs past the old mill, and the stone bridge's arch holds. "
    block = sentence * (1_000_000 // len(sentence))
    write(small / "train.txt", block[:20_000] + "\n")
    with open(big / "train.txt", "w", encoding="utf-8") as f:
        for _ in range(200):  # 200 MB, no line break at all
            f.write(block)
    size_mb = os.path.getsize(big / "train.txt") / 1e6
    baseline = _peak_memory_mb(small, small)
    peak = _peak_memory_mb(big, big)
    # Reading the line whole would take 3 to 4 times the file size.
    print(f"peak {peak:.0f} MB, baseline {baseline:.0f} MB, file {size_mb:.0f} MB")
    assert peak - baseline < 64, (peak, baseline, size_mb)
    rec = records(big / "train.npy")
    assert len(rec) == 1 and rec["length"][0] == 64
    assert rec["text_ids"][0].tolist() == [EOS_ID] + get_encoder().encode(block)[:62] + [EOS_ID]


# ------------------------------------------------- more bad input, one line each

def _setup_bad_input(tmp_path, case):
    """Files for one bad-input case, and the extra command-line arguments."""
    write(tmp_path / "dev.txt", "Hello world\n")
    if case == "split_is_a_directory":
        (tmp_path / "train.txt").mkdir()
        return []
    if case == "split_is_a_broken_link":
        os.symlink(tmp_path / "gone.txt", tmp_path / "train.txt")
        return []
    write(tmp_path / "train.txt", "Hello world\n")
    if case == "output_is_a_directory":
        (tmp_path / "train.npy").mkdir()
        return []
    if case == "pretrain_model_dir_is_a_file":
        write(tmp_path / "model.ckpt", "x")
        return ["--pretrain_model_dir", tmp_path / "model.ckpt"]
    return {"num_workers_huge": ["--num_workers", 10 ** 9],
            "num_workers_zero": ["--num_workers", 0],
            "max_seq_length_zero": ["--max_seq_length", 0]}[case]


@pytest.mark.parametrize("case, message", [
    ("split_is_a_directory", "train.txt is not a regular file: make it the train examples"),
    ("split_is_a_broken_link", "train.txt is a broken link: make it the train examples"),
    ("output_is_a_directory", "train.npy is a directory: move it away, or give another "
                              "--output_dir"),
    ("pretrain_model_dir_is_a_file", "model.ckpt is a file: give the model directory that "
                                     "holds encoder.json and vocab.bpe"),
    ("num_workers_huge", "--num_workers must be 1 to "),
    ("num_workers_zero", "--num_workers must be 1 to "),
    ("max_seq_length_zero", "--max_seq_length must be at least 3 (got 0)"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, case, message):
    args = _setup_bad_input(tmp_path, case)
    before = sorted(os.listdir(tmp_path))
    proc = script_server.run([sys.executable, "prepare_data.py", "--quiet", "--data_dir",
                           str(tmp_path), *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing left
    if case == "output_is_a_directory":
        assert os.listdir(tmp_path / "train.npy") == []


def test_unreadable_text_file_is_an_error(tmp_path, monkeypatch):
    write(tmp_path / "train.txt", "Hello world\n")

    def no_read(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(text_lines, "open", no_read, raising=False)
    with pytest.raises(UserError, match=r"cannot read .*train.txt \(Permission denied\)"):
        prepare("--data_dir", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["train.txt"]
