"""utils.checkpoints.openai_files: model names, the default directory, and each file's content check.

Also the sample files test_download.py serves: a tiny checkpoint written by
real TensorFlow (tests/fixtures) and a made-up tokenizer, and a corrupt copy
of each that its check refuses.
"""
import json
import os

import pytest

from utils.errors import UserError
from utils.checkpoints.openai_files import (MODEL_FILES, canonical_model_name, check_model_file,
                               default_model_dir, file_problems,
                               model_name_of_dir)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(REPO_ROOT, "tests", "fixtures", "tf_gpt2", "models", "tiny_a")
BIG = "model.ckpt.data-00000-of-00001"
INDEX = "model.ckpt.index"
PORTAL = (b"<!DOCTYPE html>\n<html><head><title>Wi-Fi login</title></head>"
          b"<body>Please log in</body></html>\n")


def make_files():
    """The seven files, each passing its check; the weights file is the big one."""
    files = {}
    for name in ("checkpoint", "hparams.json", BIG, INDEX, "model.ckpt.meta"):
        with open(os.path.join(TINY_MODEL, name), "rb") as f:
            files[name] = f.read()
    files["encoder.json"] = json.dumps({f"tok{i}": i for i in range(8000)}).encode()
    files["vocab.bpe"] = ("#version: 0.2\n" +
                          "".join(f"a{i} b{i}\n" for i in range(9000))).encode()
    return files


def flip_byte(data, at):
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


CORRUPT = {   # file -> (corrupt copy of the good one, words of the check that fails)
    "hparams.json": (lambda good: good[:-3], "not valid JSON"),
    "encoder.json": (lambda good: b'["not", "a", "mapping"]', "JSON object"),
    "checkpoint": (lambda good: b'all_model_checkpoint_paths: "x"\n',
                   "model_checkpoint_path"),
    "vocab.bpe": (lambda good: b"#version: 0.2\na b c\n", "line 2"),
    INDEX: (lambda good: flip_byte(good, 100), "checkpoint index (it is corrupt (checksum"),
    BIG: (lambda good: good + b"\0", f"is {1616289} bytes but {INDEX} says 1616288"),
}


def write_model(model_dir, files):
    os.makedirs(model_dir, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(data)
    return str(model_dir)


def test_model_names():
    for alias in ("117M", "124M", "gpt2", "gpt2-small", "GPT2-Small"):
        assert canonical_model_name(alias) == "117M"
    for alias in ("345M", "355M", "gpt2-medium"):
        assert canonical_model_name(alias) == "345M"
    assert canonical_model_name("gpt2-large") == "774M"
    assert canonical_model_name("gpt2-xl") == "1558M"
    with pytest.raises(UserError, match="117M.*345M.*774M.*1558M"):
        canonical_model_name("2B")
    assert default_model_dir("124M") == os.path.join("gpt2_pretrained_models", "model_117M")


def test_model_name_of_a_directory():
    assert model_name_of_dir(default_model_dir("345M")) == "345M"
    assert model_name_of_dir("/a/b/model_124M/") == "117M"
    assert model_name_of_dir("model_gpt2-xl") == "1558M"
    for other in ("my_model", "model_", "model_2B", "models/345M", "117M", ""):
        assert model_name_of_dir(other) is None, other
    # Where a bare model name counts as well (checkpoint loading's rule).
    assert model_name_of_dir("models/355M", prefix_optional=True) == "345M"
    assert model_name_of_dir("a/model_gpt2/", prefix_optional=True) == "117M"
    assert model_name_of_dir("my_model", prefix_optional=True) is None


def test_good_files_pass_their_checks(tmp_path):
    model_dir = write_model(tmp_path / "m", make_files())
    for name in MODEL_FILES:
        assert check_model_file(os.path.join(model_dir, name)) is None, name
    assert file_problems(model_dir) == {} 


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_each_corrupt_file_is_named_with_its_problem(tmp_path, name):
    files = make_files()
    corrupt, words = CORRUPT[name]
    files[name] = corrupt(files[name])
    model_dir = write_model(tmp_path / "m", files)
    problems = file_problems(model_dir)
    assert list(problems) == [name] and words in problems[name], problems
    assert list(file_problems(model_dir)) == [name]


def test_missing_empty_and_html_files(tmp_path):
    files = make_files()
    del files["vocab.bpe"]
    files["checkpoint"] = b""
    files["model.ckpt.meta"] = PORTAL   # no content check of its own: caught as HTML
    model_dir = write_model(tmp_path / "m", files)
    assert file_problems(model_dir) == {
        "checkpoint": "is empty", "model.ckpt.meta": "is an HTML page, not the model file",
        "vocab.bpe": "is missing"}


def test_a_partial_is_checked_as_the_file_it_will_become(tmp_path):
    model_dir = write_model(tmp_path / "m", make_files())
    partial = os.path.join(model_dir, "hparams.json.partial")
    with open(partial, "wb") as f:
        f.write(b'{"n_vocab": 50257}')
    assert check_model_file(partial, "hparams.json") == "lacks n_ctx, n_embd, n_head, n_layer"
    assert check_model_file(partial) is None   # an unknown kind: only the generic checks


def test_the_weights_are_checked_after_their_index(tmp_path):
    """A cut weights file beside a corrupt index is not judged until the index is good."""
    files = make_files()
    files[BIG] = files[BIG][:-1000]
    files[INDEX] = flip_byte(files[INDEX], 200)
    model_dir = write_model(tmp_path / "m", files)
    assert list(file_problems(model_dir)) == [INDEX]
    write_model(model_dir, {INDEX: make_files()[INDEX]})
    assert file_problems(model_dir) == {BIG: f"is 1615288 bytes but {INDEX} says 1616288"}
