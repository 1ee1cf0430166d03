"""No command writes onto a file it reads, replaces a file unasked, or shares an
output with another run (issue 19, items 1, 5, 6 and 7)."""
import errno
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import convert_checkpoint
import gpt2_generate_main
import prepare_data
from utils.checkpoints.hf_dir import HF_DIR_FILES
from utils.dir_claim import FileClaim
from user_files import (REPO, TINY_A, assert_one_line_error, run_in_process, run_script,
                        snapshot, tiny_models)

GREEDY = ["--decoding_strategy", "greedy", "--max_decoding_length", "8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("models")))


def generate(argv, monkeypatch, capsys, stdin=""):
    return run_in_process(gpt2_generate_main.main, argv, monkeypatch, capsys, stdin)


def convert(argv, monkeypatch, capsys):
    return run_in_process(convert_checkpoint.main, argv, monkeypatch, capsys)


# ------------------------------------------------------- item 1: generate's output

@pytest.mark.parametrize("target", ["ckpt", "prompts", "config.json", "hardlink"])
def test_generate_output_onto_an_input_is_refused(target, models, tmp_path,
                                                  monkeypatch, capsys):
    ckpt, hf = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hi\n", encoding="utf-8")
    if target == "hardlink":  # another name for the checkpoint
        os.link(ckpt, tmp_path / "samples.txt")
    output = {"ckpt": ckpt, "prompts": prompts, "config.json": os.path.join(hf, "config.json"),
              "hardlink": tmp_path / "samples.txt"}[target]
    model = ["--pretrain_model_dir", hf] if target == "config.json" else ["--checkpoint", ckpt]
    before = snapshot(ckpt, hf, prompts)
    code, _, err = generate([*model, "--prompt_file", prompts, "--output_file", output,
                             "--overwrite", *GREEDY], monkeypatch, capsys)
    assert_one_line_error(code, err, f"--output_file {output} is", "which this run reads")
    assert snapshot(ckpt, hf, prompts) == before


def test_generate_replaces_an_existing_output_only_with_overwrite(models, tmp_path,
                                                                  monkeypatch, capsys):
    ckpt, _ = models
    out = tmp_path / "samples.jsonl"
    out.write_text("keep me\n")
    argv = ["--checkpoint", ckpt, "--prompt", "hi", "--output_file", out, *GREEDY]
    code, _, err = generate(argv, monkeypatch, capsys)
    assert_one_line_error(code, err, f"--output_file {out} exists", "--overwrite")
    assert out.read_text() == "keep me\n"
    code, _, err = generate(argv + ["--overwrite"], monkeypatch, capsys)
    assert code == 0, err
    assert '"prompt": "hi"' in out.read_text()


def test_output_created_by_another_run_meanwhile_is_kept(tmp_path):
    from utils.atomic import atomic_write
    from utils.errors import UserError
    out = tmp_path / "x.txt"
    with pytest.raises(UserError, match="created by another run"):
        with atomic_write(str(out), "w", replace=False) as f:
            f.write("mine")
            out.write_text("theirs")
    assert out.read_text() == "theirs"
    assert os.listdir(tmp_path) == ["x.txt"]  # no temporary file left


# ------------------------------------------------------- prepare's output

def test_prepare_output_linked_onto_its_input_is_refused(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("one line\nanother\n")
    os.symlink(data / "train.txt", data / "train.npy")
    before = snapshot(data / "train.txt")
    code, _, err = run_in_process(prepare_data.main, ["--data_dir", data, "--quiet"],
                                  monkeypatch, capsys)
    assert_one_line_error(code, err, "train.npy is the train split", "which this run reads")
    assert snapshot(data / "train.txt") == before


# ------------------------------------------------------- items 5, 6: convert's DST

def test_convert_ckpt_onto_an_input_or_existing_file(models, tmp_path, monkeypatch, capsys):
    ckpt, hf = models
    before = snapshot(ckpt, hf)
    os.link(ckpt, tmp_path / "same.ckpt")
    code, _, err = convert([ckpt, tmp_path / "same.ckpt", "--format", "ckpt", "--force"],
                           monkeypatch, capsys)
    assert_one_line_error(code, err, "is SRC itself")
    code, _, err = convert([hf, os.path.join(hf, "vocab.json"), "--format", "ckpt",
                            "--force"], monkeypatch, capsys)
    assert_one_line_error(code, err, "which this run reads")
    existing = tmp_path / "old.ckpt"
    existing.write_bytes(b"old")
    code, _, err = convert([hf, existing, "--format", "ckpt"], monkeypatch, capsys)
    assert_one_line_error(code, err, f"DST {existing} exists", "--force")
    assert existing.read_bytes() == b"old" and snapshot(ckpt, hf) == before


@pytest.mark.parametrize("case", ["empty", "dangling", "dir_named_like_ours"])
def test_convert_bad_dst_is_one_line_and_dst_untouched(case, models, tmp_path,
                                                       monkeypatch, capsys):
    ckpt, _ = models
    dst = tmp_path / "dst"
    force = []
    if case == "empty":
        dst = ""
    elif case == "dangling":
        os.symlink(tmp_path / "nowhere", dst)
    else:
        (dst / "config.json").mkdir(parents=True)
        (dst / "vocab.json").write_text("theirs")
        force = ["--force"]
    before = snapshot(dst) if case == "dir_named_like_ours" else None
    code, _, err = convert([ckpt, dst, "--format", "hf", *force], monkeypatch, capsys)
    needle = {"empty": "DST is empty", "dangling": "does not exist",
              "dir_named_like_ours": "config.json, which is not a file"}[case]
    assert_one_line_error(code, err, needle)
    if before is not None:
        assert snapshot(dst) == before and sorted(os.listdir(dst)) == ["config.json",
                                                                      "vocab.json"]
    assert not os.path.exists(tmp_path / "nowhere")


def test_convert_removes_stale_staging_with_a_note(models, tmp_path, monkeypatch, capsys):
    ckpt, _ = models
    dst = tmp_path / "dst"
    (dst / ".staging.999999999").mkdir(parents=True)  # a pid no process has
    (dst / ".staging.999999999" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".dst.abc123.converting").mkdir()       # an earlier version's
    code, _, err = convert([ckpt, dst, "--format", "hf"], monkeypatch, capsys)
    assert code == 0, err
    assert err.count("note: removed") == 2, err
    assert not os.path.exists(tmp_path / ".dst.abc123.converting")
    assert sorted(os.listdir(dst)) == sorted(HF_DIR_FILES)


def test_convert_stages_on_dst_own_filesystem(models, tmp_path, monkeypatch, capsys):
    """DST a mount point: any rename between DST and its parent fails with EXDEV."""
    ckpt, _ = models
    dst = tmp_path / "mnt"
    dst.mkdir()
    inside = str(dst) + os.sep
    real_rename, real_replace = os.rename, os.replace

    def across(src, target):
        return str(src).startswith(inside) != str(target).startswith(inside)

    def guarded(real):
        def move(src, target, *a, **k):
            if across(src, target):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(src, target, *a, **k)
        return move
    monkeypatch.setattr(os, "rename", guarded(real_rename))
    monkeypatch.setattr(os, "replace", guarded(real_replace))
    code, _, err = convert([ckpt, dst, "--format", "hf"], monkeypatch, capsys)
    assert code == 0, err
    assert "config.json" in os.listdir(dst)


def test_two_converts_into_one_new_dst_one_wins(models, tmp_path):
    ckpt, _ = models
    dst = tmp_path / "dst"
    procs = [subprocess.Popen([sys.executable, "convert_checkpoint.py", ckpt, str(dst),
                               "--format", "openai"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = [err for code, err in results if code == 2][0]
    assert_one_line_error(2, loser, "DST")
    assert "another run" in loser or "not empty" in loser, loser
    assert sorted(os.listdir(dst)) == sorted(convert_checkpoint_files("openai"))


def test_a_ckpt_dst_has_one_writer_even_with_force(models, tmp_path, monkeypatch, capsys):
    """While one run writes a .ckpt into a folder (its claim held), another
    run writing there, --force or not, stops with one line and the file
    stays as it was."""
    ckpt, _ = models
    dst = tmp_path / "model.ckpt"
    dst.write_bytes(b"the user's earlier export")
    with FileClaim(str(dst), "DST"):
        code, _, err = convert([ckpt, str(dst), "--format", "ckpt", "--force"],
                               monkeypatch, capsys)
    assert_one_line_error(code, err, "another run is writing a file into")
    assert dst.read_bytes() == b"the user's earlier export"
    code, _, err = convert([ckpt, str(dst), "--format", "ckpt", "--force"], monkeypatch,
                           capsys)
    assert code == 0, err


def convert_checkpoint_files(fmt):
    from utils.checkpoints.convert import written_paths
    return [os.path.basename(p) for p in written_paths("d", fmt)]


# ------------------------------------------------------- item 7: --prompt_file

def test_prompt_file_from_closed_stdin(models):
    ckpt, _ = models
    proc = run_script("gpt2_generate_main.py", ["--checkpoint", ckpt, "--prompt_file", "-",
                                                *GREEDY], stdin=subprocess.DEVNULL,
                      preexec_fn=lambda: os.close(0))
    assert_one_line_error(proc.returncode, proc.stderr, "standard input is closed")


def test_prompt_file_dev_zero_and_fifo_without_writer(models, tmp_path, monkeypatch,
                                                      capsys):
    ckpt, _ = models
    code, _, err = generate(["--checkpoint", ckpt, "--prompt_file", "/dev/zero", *GREEDY],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, "--prompt_file /dev/zero is a device")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    code, _, err = generate(["--checkpoint", ckpt, "--prompt_file", fifo, *GREEDY],
                            monkeypatch, capsys)
    assert_one_line_error(code, err, f"--prompt_file {fifo} is a named pipe")
    assert time.monotonic() - start < 60


def test_prompt_from_stdin_is_bounded(monkeypatch):
    import io
    from utils.samples import prompts
    from utils.errors import UserError
    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 1000)
    fake = io.TextIOWrapper(io.BytesIO(b"\0" * 5000))
    monkeypatch.setattr(sys, "stdin", fake)
    with pytest.raises(UserError, match="more than 1,000 bytes"):
        prompts.read_prompts([], "-")


# ------------------------------------------------------- property: outputs on inputs

SPELLINGS = st.sampled_from(["plain", "dot", "parent", "symlink", "hardlink",
                             "linked_dir"])


def spell(path, how, scratch):
    """Another name for `path` (a file), made in `scratch`."""
    directory, name = os.path.split(path)
    if how == "dot":
        return os.path.join(directory, ".", name)
    if how == "parent":
        return os.path.join(directory, "..", os.path.basename(directory), name)
    if how == "symlink":
        link = os.path.join(scratch, "link_" + name)
        os.symlink(path, link)
        return link
    if how == "hardlink":
        link = os.path.join(scratch, "hard_" + name)
        os.link(path, link)
        return link
    if how == "linked_dir":
        link = os.path.join(scratch, "dirlink")
        os.symlink(directory, link)
        return os.path.join(link, name)
    return path


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["generate", "convert", "prepare"]), how=SPELLINGS,
       target=st.integers(0, 2))
def test_any_output_resolving_to_an_input_is_refused_before_the_model_is_read(
        command, how, target, models, tmp_path_factory, monkeypatch, capsys):
    import utils.checkpoints.convert
    import utils.checkpoints.weights
    ckpt, hf = models
    scratch = str(tmp_path_factory.mktemp("spell"))
    prompts = os.path.join(scratch, "prompts.txt")
    data = os.path.join(scratch, "data")
    os.mkdir(data)
    with open(prompts, "w") as f:
        f.write("hi\n")
    with open(os.path.join(data, "train.txt"), "w") as f:
        f.write("text\n")

    def never(*a, **k):
        raise AssertionError("the model was read before the output was checked")
    monkeypatch.setattr(utils.checkpoints.weights, "resolve_model", never)
    monkeypatch.setattr(utils.checkpoints.convert, "open_source", never)
    monkeypatch.setattr(prepare_data, "check_input", never)
    if command == "generate":
        inputs = [ckpt, prompts, os.path.join(hf, "config.json")]
        model = (["--pretrain_model_dir", hf] if target == 2 else ["--checkpoint", ckpt])
        out = spell(inputs[target], how, scratch)
        argv = [*model, "--prompt_file", prompts, "--output_file", out, "--overwrite",
                *GREEDY]
        main, watched = gpt2_generate_main.main, [ckpt, hf, prompts]
    elif command == "convert":
        inputs = [ckpt, os.path.join(hf, "vocab.json"), os.path.join(hf, "merges.txt")]
        src = ckpt if target == 0 else hf
        out = spell(inputs[target], how, scratch)
        argv = [src, out, "--format", "ckpt", "--force"]
        main, watched = convert_checkpoint.main, [ckpt, hf]
    else:
        train = os.path.join(data, "train.txt")
        vocab = os.path.join(hf, ["vocab.json", "merges.txt", "vocab.json"][target])
        source = spell(train if target != 1 else vocab, how, scratch)
        os.symlink(source, os.path.join(data, "train.npy"))
        argv = ["--data_dir", data, "--pretrain_model_dir", hf, "--quiet"]
        main, watched = prepare_data.main, [train, hf]
    before = snapshot(*watched)
    code, _, err = run_in_process(main, argv, monkeypatch, capsys)
    assert_one_line_error(code, err, "this run reads")
    assert snapshot(*watched) == before
