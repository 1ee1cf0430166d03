"""Each message names the flag or file and the fix for that kind of input
(issue 19, item 11)."""
import os
import shutil
import subprocess
import sys

import pytest

import gpt2_generate_main
from user_files import (REPO, assert_one_line_error, run_in_process, snapshot,
                        tiny_models)

GREEDY = ["--decoding_strategy", "greedy", "--max_decoding_length", "8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("models")))


@pytest.mark.parametrize("value", ["1e-40", "1e40"])
def test_repetition_penalty_out_of_range_names_the_flag(value, models, monkeypatch,
                                                        capsys):
    ckpt, _ = models
    code, _, err = run_in_process(gpt2_generate_main.main, [
        "--checkpoint", ckpt, "--prompt", "hi", "--repetition_penalty", value, *GREEDY],
        monkeypatch, capsys)
    line = assert_one_line_error(code, err, "--repetition_penalty must be between 0.01 "
                                            "and 100", "1.2 is common")
    assert "weights" not in line and "16-bit" not in line


def test_invalid_byte_in_prompt_names_the_flag_and_utf8(models):
    """Through a real command line: the byte reaches Python as argv bytes."""
    ckpt, _ = models
    proc = subprocess.run([sys.executable.encode(), b"gpt2_generate_main.py",
                           b"--checkpoint", ckpt.encode(), b"--prompt", b"ok",
                           b"--prompt", b"caf\xe9", *[a.encode() for a in GREEDY]],
                          cwd=REPO, capture_output=True, timeout=120)
    line = assert_one_line_error(proc.returncode, proc.stderr,
                                 "--prompt 2 is not valid UTF-8", "byte 0xe9")
    assert "surrogate" not in line


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_corrupt_hugging_face_tokenizer_names_its_own_files(name, models, tmp_path,
                                                            monkeypatch, capsys):
    _, hf = models
    model = tmp_path / "hf"
    shutil.copytree(hf, model)
    (model / name).write_text("{ not what it should be" if name == "vocab.json"
                              else "no version header\n")
    before = snapshot(model)
    code, _, err = run_in_process(gpt2_generate_main.main, [
        "--pretrain_model_dir", model, "--prompt", "hi", *GREEDY], monkeypatch, capsys)
    line = assert_one_line_error(code, err, str(model / name),
                                 "re-download vocab.json and merges.txt")
    assert "encoder.json" not in line and "vocab.bpe" not in line
    assert snapshot(model) == before
