"""utils.checkpoints.download against a real HTTP server on 127.0.0.1 (no other network).

The server (model_server.py) implements Range requests and misbehaves on
demand: drops connections, sends short or unannounced bodies, ignores Range,
answers 404/500, stalls, trickles, serves a captive portal's page or a corrupt
file. The files it serves, and their corrupt copies, come from test_model_files.py.

In-process downloads get a fake sleep and CLI runs $GPT2_DOWNLOAD_BACKOFF=0,
so no test waits out a real back-off.
"""
import os
import socket
import sys
import threading

import pytest

from model_server import Server
from test_model_files import BIG, CORRUPT, INDEX, PORTAL, flip_byte, make_files
from utils.checkpoints import download
from utils.checkpoints.download import download_model
from utils.errors import UserError
from utils.checkpoints.openai_files import MODEL_FILES, file_problems
import script_server

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files():
    return make_files()


@pytest.fixture
def server(files):
    srv = Server(files)
    yield srv
    srv.close()


class Sleeps(list):
    """A fake time.sleep that records the backoff delays."""

    def __call__(self, seconds):
        self.append(seconds)


def wait_until(condition, limit_s=5.0):
    event = threading.Event()
    for _ in range(int(limit_s / 0.01)):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


def fetch(server, tmp_path, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout", 5)
    kwargs.setdefault("sleep", Sleeps())
    return download_model("117M", str(tmp_path / "model_117M"), server.url, **kwargs)


def assert_complete(model_dir, files):
    for name, data in files.items():
        with open(os.path.join(model_dir, name), "rb") as f:
            assert f.read() == data, name
        assert not os.path.exists(os.path.join(model_dir, name + ".partial"))
    assert file_problems(model_dir) == {}


def test_model_file_url():
    assert (download.model_file_url("345M", "vocab.bpe") ==
            "https://openaipublic.blob.core.windows.net/gpt-2/models/355M/vocab.bpe")
    assert (download.model_file_url("gpt2", "hparams.json", "http://mirror/m/") ==
            "http://mirror/m/124M/hparams.json")


def test_complete_download(server, files, tmp_path):
    model_dir = fetch(server, tmp_path)
    assert model_dir == str(tmp_path / "model_117M")
    assert_complete(model_dir, files)
    # Local 117M is OpenAI's 124M folder; fresh downloads send no Range.
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{f}" for f in MODEL_FILES)
    assert all(r is None for _, r in server.requests)


def drop_once_saved(server, tmp_path, sent=150_000):
    """Reset BIG's connection after `sent` bytes, once the client has saved them
    all (a reset discards bytes still in flight): the resume point is `sent`."""
    server.drop_after[f"/124M/{BIG}"] = sent
    partial = tmp_path / "model_117M" / (BIG + ".partial")
    server.before_drop = lambda: wait_until(
        lambda: partial.exists() and partial.stat().st_size >= sent)
    return sent


def test_dropped_connection_resumes_with_range(server, files, tmp_path):
    on_disk = drop_once_saved(server, tmp_path)
    sleeps = Sleeps()
    model_dir = fetch(server, tmp_path, sleep=sleeps)
    assert_complete(model_dir, files)
    assert server.ranges(BIG) == [None, f"bytes={on_disk}-"]
    assert sleeps == [download.DEFAULT_BACKOFF.base_s]


def test_resume_sends_if_range_and_restarts_when_the_file_changed(server, files, tmp_path):
    """A file replaced on the server (same size) between a drop and the resume
    must not be spliced: If-Range makes the server send the new one whole."""
    path = f"/124M/{BIG}"
    server.etags[path] = '"v1"'
    server.drop_after[path] = 150_000
    partial = tmp_path / "model_117M" / (BIG + ".partial")
    new = bytes(reversed(files[BIG]))

    def replace_file():
        wait_until(lambda: partial.exists() and partial.stat().st_size >= download.CHUNK_BYTES)
        server.files[path], server.etags[path] = new, '"v2"'
    server.before_drop = replace_file
    model_dir = fetch(server, tmp_path)
    assert_complete(model_dir, {**files, BIG: new})
    assert [v for p, v in server.if_ranges if p == path] == [None, '"v1"']
    assert not os.path.exists(str(partial) + download.VALIDATOR_SUFFIX)


def test_resume_with_an_unchanged_file_appends(server, files, tmp_path):
    path = f"/124M/{BIG}"
    server.etags[path] = '"v1"'
    on_disk = drop_once_saved(server, tmp_path)
    assert_complete(fetch(server, tmp_path), files)
    assert server.ranges(BIG) == [None, f"bytes={on_disk}-"]
    assert [v for p, v in server.if_ranges if p == path] == [None, '"v1"']


def test_second_downloader_waits_for_the_first(server, files, tmp_path):
    """While another process holds the directory's lock nothing is fetched;
    once it is released, files that appeared meanwhile are not fetched again."""
    import fcntl
    model_dir = tmp_path / "model_117M"
    model_dir.mkdir()
    with open(model_dir / download.LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what another downloader holds
        result = {}
        thread = threading.Thread(target=lambda: result.update(dir=fetch(server, tmp_path)))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive() and server.requests == []
        for name, data in files.items():  # the other process finishes
            if name != "vocab.bpe":
                (model_dir / name).write_bytes(data)
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(30)
    assert_complete(result["dir"], files)
    assert [p for p, _ in server.requests] == ["/124M/vocab.bpe"]


def test_server_ignoring_range_restarts_from_zero(server, files, tmp_path):
    server.ignore_range = True
    server.drop_after[f"/124M/{BIG}"] = 200_000
    partial = tmp_path / "model_117M" / (BIG + ".partial")
    server.before_drop = lambda: wait_until(
        lambda: partial.exists() and partial.stat().st_size >= download.CHUNK_BYTES)
    model_dir = fetch(server, tmp_path)
    assert_complete(model_dir, files)
    ranges = server.ranges(BIG)
    # Asked to resume, got 200, and that full body alone completed the file.
    assert len(ranges) == 2 and ranges[1].startswith("bytes=")


def test_truncated_response_is_detected_and_retried(server, files, tmp_path):
    server.truncate_to["/124M/model.ckpt.meta"] = 30_000
    model_dir = fetch(server, tmp_path)
    assert_complete(model_dir, files)
    assert len(server.ranges("model.ckpt.meta")) == 2


def test_short_body_caught_by_size_check(server, files, tmp_path, monkeypatch):
    # urllib3 1.x (and other lenient stacks) end a short body without an error;
    # the size check against Content-Length must catch it on its own.
    def lenient_read(resp, deadline):
        for chunk in original(resp, deadline):
            yield chunk
            if resp.url.endswith(BIG) and not cut:
                cut.append(len(chunk))
                return
    original, cut = download._read_body, []
    monkeypatch.setattr(download, "_read_body", lenient_read)
    assert_complete(fetch(server, tmp_path), files)
    assert server.ranges(BIG) == [None, f"bytes={cut[0]}-"]


def test_existing_partial_is_resumed(server, files, tmp_path):
    model_dir = tmp_path / "model_117M"
    model_dir.mkdir()
    (model_dir / (BIG + ".partial")).write_bytes(files[BIG][:123_456])
    fetch(server, tmp_path)
    assert_complete(str(model_dir), files)
    assert server.ranges(BIG) == ["bytes=123456-"]


def test_complete_partial_is_moved_into_place(server, files, tmp_path):
    # A run killed between the last byte and the rename: the server answers 416.
    model_dir = tmp_path / "model_117M"
    model_dir.mkdir()
    (model_dir / "vocab.bpe.partial").write_bytes(files["vocab.bpe"])
    fetch(server, tmp_path)
    assert_complete(str(model_dir), files)
    assert server.ranges("vocab.bpe") == [f"bytes={len(files['vocab.bpe'])}-"]


def test_complete_files_are_not_downloaded_again(server, files, tmp_path):
    model_dir = fetch(server, tmp_path)
    os.remove(os.path.join(model_dir, "hparams.json"))
    server.requests.clear()
    assert fetch(server, tmp_path) == model_dir
    assert [p for p, _ in server.requests] == ["/124M/hparams.json"]
    server.requests.clear()
    assert file_problems(model_dir) == {}
    assert server.requests == []


def test_404_names_file_and_leaves_nothing(server, files, tmp_path):
    del server.files["/124M/hparams.json"]
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path)
    message = str(err.value)
    assert "hparams.json" in message and f"{server.url}/124M/hparams.json" in message
    assert "404" in message and str(tmp_path / "model_117M") in message
    assert "\n" not in message
    assert not os.path.exists(tmp_path / "model_117M" / "hparams.json")
    assert not os.path.exists(tmp_path / "model_117M" / "hparams.json.partial")
    assert server.ranges("hparams.json") == [None]    # 404 is not retried


def test_server_error_is_retried_with_backoff(server, files, tmp_path):
    server.fail_status["/124M/checkpoint"] = [500, 503]
    sleeps = Sleeps()
    assert_complete(fetch(server, tmp_path, sleep=sleeps), files)
    assert sleeps == [download.DEFAULT_BACKOFF.base_s, 2 * download.DEFAULT_BACKOFF.base_s]


def test_persistent_server_error_gives_up(server, tmp_path):
    server.fail_status["/124M/checkpoint"] = [500] * 10
    sleeps = Sleeps()
    with pytest.raises(UserError, match=r"checkpoint from .*HTTP 500.*after 4 tries"):
        fetch(server, tmp_path, retries=3, sleep=sleeps)
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(server.ranges("/checkpoint")) == 4


def test_timeout_is_retried(server, files, tmp_path):
    server.stall_s["/124M/encoder.json"] = 1.0
    assert_complete(fetch(server, tmp_path, timeout=0.3), files)
    assert len(server.ranges("encoder.json")) == 2


def test_refused_connection(tmp_path):
    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(UserError, match=r"could not download \w+ from http://127\.0\.0\.1"
                                        r".*refused.*by hand into"):
        download_model("117M", str(tmp_path / "m"), f"http://127.0.0.1:{port}",
                       retries=2, progress=False, sleep=sleeps)
    assert len(sleeps) == 2
    assert not os.path.exists(tmp_path / "m")   # no empty model dir left behind


def test_dns_failure(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(UserError, match=r"checkpoint from http://mirror\.example/124M"):
        download_model("117M", str(tmp_path / "m"), "http://mirror.example",
                       retries=1, progress=False, sleep=Sleeps())


def test_env_var_base_url(server, files, tmp_path, monkeypatch):
    monkeypatch.setenv(download.BASE_URL_ENV, server.url + "/")
    model_dir = download_model("gpt2", str(tmp_path / "d"), progress=False)
    assert_complete(model_dir, files)


def test_interrupt_keeps_partial(server, files, tmp_path, monkeypatch):
    received = []

    def interrupting_read(resp, deadline):
        for i, chunk in enumerate(original(resp, deadline)):
            if resp.url.endswith(BIG) and i == 2:
                raise KeyboardInterrupt
            received.append(len(chunk) if resp.url.endswith(BIG) else 0)
            yield chunk
    original = download._read_body
    monkeypatch.setattr(download, "_read_body", interrupting_read)
    with pytest.raises(KeyboardInterrupt):
        fetch(server, tmp_path)
    monkeypatch.undo()
    partial = tmp_path / "model_117M" / (BIG + ".partial")
    assert partial.stat().st_size == sum(received) > 0   # every piece received is kept
    assert not (tmp_path / "model_117M" / BIG).exists()
    fetch(server, tmp_path)
    assert_complete(str(tmp_path / "model_117M"), files)
    assert server.ranges(BIG)[-1] == f"bytes={sum(received)}-"


def run_cli(args, cwd, env_extra=None, script=False):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, **{download.BACKOFF_ENV: "0"},
               **(env_extra or {}))
    cmd = (["sh", os.path.join(REPO_ROOT, "download_model.sh")] if script
           else [sys.executable, "-m", "utils.checkpoints.download"])
    return script_server.run(cmd + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_404_is_one_line_exit_2(server, tmp_path):
    server.files.clear()
    proc = run_cli(["345M", "--model_dir", str(tmp_path / "m"), "--base_url", server.url],
                   cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download checkpoint")
    assert "/355M/checkpoint" in lines[0] and "404" in lines[0]


def test_cli_downloads_default_model_into_default_dir(server, files, tmp_path):
    # download_model.sh, run from elsewhere, with the base URL from the environment.
    proc = run_cli([], cwd=tmp_path, env_extra={download.BASE_URL_ENV: server.url},
                   script=True)
    assert proc.returncode == 0, proc.stderr
    expected = os.path.join("gpt2_pretrained_models", "model_117M")
    assert expected in proc.stdout
    assert_complete(str(tmp_path / expected), files)


# --- nothing incomplete, foreign or corrupt is renamed into place -------------

def one_line_error(err_info, *needles):
    message = str(err_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def assert_absent(model_dir, name):
    """Neither the file nor anything of its download is left behind."""
    for suffix in ("", ".partial", ".partial" + download.VALIDATOR_SUFFIX):
        assert not os.path.exists(os.path.join(model_dir, name + suffix)), name + suffix


@pytest.mark.parametrize("how", ["content_type", "doctype", "html_tag"])
def test_html_page_with_200_is_never_renamed_into_place(server, tmp_path, how):
    path = "/124M/hparams.json"
    if how == "content_type":
        server.portal.add(path)
    elif how == "doctype":   # served as application/octet-stream: sniffed
        server.files[path] = PORTAL
    else:
        server.files[path] = b"\n  <HTML><body>503 upstream unavailable</body></HTML>"
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path)
    one_line_error(err, "hparams.json", "HTML page", "captive portal", "by hand into")
    assert_absent(tmp_path / "model_117M", "hparams.json")
    assert len(server.ranges("hparams.json")) == 1   # a portal is not retried


def test_html_page_leaves_an_existing_partial_alone(server, files, tmp_path):
    model_dir = tmp_path / "model_117M"
    model_dir.mkdir()
    partial = model_dir / (BIG + ".partial")
    partial.write_bytes(files[BIG][:123_456])
    server.portal.add(f"/124M/{BIG}")
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path)
    one_line_error(err, BIG, "HTML page")
    assert partial.read_bytes() == files[BIG][:123_456]
    assert not (model_dir / BIG).exists()
    assert server.ranges(BIG) == ["bytes=123456-"]


def test_body_always_short_of_its_content_length_never_lands(server, files, tmp_path):
    server.short_by["/124M/vocab.bpe"] = 10
    sleeps = Sleeps()
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path, retries=2, sleep=sleeps)
    one_line_error(err, "vocab.bpe", "after 3 tries without progress")
    model_dir = tmp_path / "model_117M"
    assert not (model_dir / "vocab.bpe").exists()
    kept = (model_dir / "vocab.bpe.partial").read_bytes()   # kept for a later resume
    assert kept == files["vocab.bpe"][:-10]
    # The first body made progress; the resumes brought nothing, three times.
    assert server.ranges("vocab.bpe") == [None] + [f"bytes={len(kept)}-"] * 3
    assert len(sleeps) == 3


def test_early_close_without_content_length_is_resumed(server, files, tmp_path):
    server.cut_no_length[f"/124M/{BIG}"] = 50_000
    assert_complete(fetch(server, tmp_path), files)
    # The close could have been the end: the Range request found the rest.
    assert server.ranges(BIG) == [None, "bytes=50000-"]


def test_whole_body_without_length_is_confirmed_by_range(server, files, tmp_path):
    server.no_length.add("/124M/encoder.json")   # every body close-delimited
    assert_complete(fetch(server, tmp_path), files)
    # 416 for the bytes after it: that was the whole file.
    assert server.ranges("encoder.json") == [None, f"bytes={len(files['encoder.json'])}-"]


def test_body_without_length_from_a_server_without_range_is_read_twice(server, files,
                                                                      tmp_path):
    server.no_length.add("/124M/encoder.json")
    server.ignore_range = True
    assert_complete(fetch(server, tmp_path), files)
    assert len(server.ranges("encoder.json")) == 2   # two reads of the same length


def test_early_close_without_length_or_range_never_lands(server, files, tmp_path):
    # Every read stops at the same byte: the two reads agree, but the JSON is cut.
    path = "/124M/hparams.json"
    server.no_length.add(path)
    server.ignore_range = True
    server.files[path] = files["hparams.json"][:40]
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path)
    one_line_error(err, "hparams.json", "failed its check twice", "not valid JSON",
                   "--base_url")
    assert_absent(tmp_path / "model_117M", "hparams.json")


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_file_on_the_server_is_fetched_twice_then_refused(server, files,
                                                                 tmp_path, name):
    corrupt, words = CORRUPT[name]
    server.files[f"/124M/{name}"] = corrupt(files[name])
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path)
    one_line_error(err, name, "failed its check twice", words, "try another --base_url")
    assert_absent(tmp_path / "model_117M", name)
    assert len(server.ranges(name)) == 2


def test_corrupt_copy_is_replaced_by_a_good_one(server, files, tmp_path, capsys):
    server.bad_bodies[f"/124M/{INDEX}"] = [files[INDEX][:-8]]   # once
    assert_complete(fetch(server, tmp_path), files)
    assert server.ranges(INDEX) == [None, None]
    assert f"{INDEX}: the download is not a readable checkpoint index" in capsys.readouterr().err


def test_bad_files_already_on_disk_are_fetched_again(server, files, tmp_path, capsys):
    model_dir = fetch(server, tmp_path)
    bad = {"hparams.json": b'{"n_vocab": 50257}',           # parses, lacks sizes
           INDEX: flip_byte(files[INDEX], 200),
           BIG: files[BIG][:-1000],                            # a cut weights file
           "model.ckpt.meta": PORTAL}                          # saved by an older run
    for name, data in bad.items():
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(data)
    # The cut weights cannot be judged against a corrupt index; once the index
    # is fetched again, they are.
    assert sorted(file_problems(model_dir)) == sorted(set(bad) - {BIG})
    server.requests.clear()
    assert fetch(server, tmp_path) == model_dir
    assert_complete(model_dir, files)
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{n}" for n in bad)
    err = capsys.readouterr().err
    assert "hparams.json lacks n_ctx, n_embd, n_head, n_layer; downloading it again" in err
    assert f"{BIG} is 1615288 bytes but {INDEX} says 1616288" in err
    # All good now: nothing is fetched again.
    server.requests.clear()
    assert file_problems(model_dir) == {} and fetch(server, tmp_path) == model_dir
    assert server.requests == []


def test_weights_checked_against_the_index_fetched_in_the_same_run(server, files, tmp_path):
    """A corrupt index on disk beside a weights file of the size it (wrongly)
    implies: the weights are checked against the index once it is fetched again."""
    model_dir = fetch(server, tmp_path)
    os.remove(os.path.join(model_dir, INDEX))
    with open(os.path.join(model_dir, BIG), "ab") as f:
        f.write(b"\0" * 16)
    server.requests.clear()
    fetch(server, tmp_path)
    assert_complete(model_dir, files)
    assert [p for p, _ in server.requests] == [f"/124M/{INDEX}", f"/124M/{BIG}"]


def test_total_timeout_stops_a_trickling_server_and_keeps_the_partial(server, tmp_path):
    server.trickle.add(f"/124M/{BIG}")
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path, total_timeout=1)
    message = one_line_error(err, BIG, "total timeout of 1 s", "--total_timeout",
                             download.TOTAL_TIMEOUT_ENV, "rerun to resume")
    partial = tmp_path / "model_117M" / (BIG + ".partial")
    assert f"kept {partial.stat().st_size} bytes in {partial}" in message
    assert partial.stat().st_size > 0
    assert not (tmp_path / "model_117M" / BIG).exists()
    assert server.ranges(BIG) == [None]   # one slow answer, not retried past the limit


def test_total_timeout_bounds_a_stalled_server(server, tmp_path):
    server.stall_s["/124M/checkpoint"] = 30
    with pytest.raises(UserError) as err:
        fetch(server, tmp_path, timeout=30, total_timeout=1)
    one_line_error(err, "checkpoint", "total timeout of 1 s", "received nothing")
    assert_absent(tmp_path / "model_117M", "checkpoint")


def test_total_timeout_and_backoff_settings(monkeypatch):
    monkeypatch.delenv(download.TOTAL_TIMEOUT_ENV, raising=False)
    assert download.resolve_total_timeout() is None
    assert download.resolve_total_timeout("2.5") == 2.5
    monkeypatch.setenv(download.TOTAL_TIMEOUT_ENV, "7200")
    assert download.resolve_total_timeout() == 7200
    assert download.resolve_total_timeout(0) is None   # 0 overrides the env: no limit
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(download.TOTAL_TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=f"{download.TOTAL_TIMEOUT_ENV} must be a "
                                            f"number of seconds >= 0"):
            download.resolve_total_timeout()
        with pytest.raises(UserError, match="--total_timeout must be"):
            download.main(["--total_timeout", bad])
    backoff = download.Backoff(base_s=0.5, max_s=8.0)
    assert [backoff.delay(n) for n in range(7)] == [0.5, 0.5, 1, 2, 4, 8, 8]
    monkeypatch.delenv(download.BACKOFF_ENV, raising=False)
    assert download.default_backoff() == download.DEFAULT_BACKOFF
    monkeypatch.setenv(download.BACKOFF_ENV, "0")
    assert download.default_backoff().delay(5) == 0
    monkeypatch.setenv(download.BACKOFF_ENV, "-2")
    with pytest.raises(UserError, match=download.BACKOFF_ENV):
        download.default_backoff()


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_cli_total_timeout_from_the_environment(server, tmp_path):
    server.trickle.add("/124M/encoder.json")
    proc = run_cli(["--model_dir", str(tmp_path / "m"), "--base_url", server.url],
                   cwd=tmp_path, env_extra={download.TOTAL_TIMEOUT_ENV: "1"})
    assert_one_error_line(proc, "encoder.json", "total timeout of 1 s", "rerun to resume")
    assert not (tmp_path / "m" / "encoder.json").exists()
    assert (tmp_path / "m" / "encoder.json.partial").stat().st_size > 0


def test_cli_html_page_and_corrupt_file_exit_2(server, files, tmp_path):
    server.portal.add("/124M/checkpoint")
    proc = run_cli(["--model_dir", str(tmp_path / "m"), "--base_url", server.url],
                   cwd=tmp_path)
    assert_one_error_line(proc, "checkpoint", "HTML page")
    assert not (tmp_path / "m").exists()   # nothing at all was saved
    server.portal.clear()
    server.files["/124M/hparams.json"] = b"{}"
    proc = run_cli(["--model_dir", str(tmp_path / "m"), "--base_url", server.url,
                    "--total_timeout", "0"], cwd=tmp_path)
    assert_one_error_line(proc, "hparams.json", "failed its check twice", "lacks n_vocab")
    assert_absent(tmp_path / "m", "hparams.json")


def test_cli_refuses_a_bad_total_timeout_before_any_request(server, tmp_path):
    proc = run_cli(["--model_dir", str(tmp_path / "m"), "--base_url", server.url,
                    "--total_timeout", "-5"], cwd=tmp_path)
    assert_one_error_line(proc, "--total_timeout must be a number of seconds >= 0")
    assert server.requests == [] and not (tmp_path / "m").exists()
