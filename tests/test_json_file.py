"""The one JSON reader (utils/json_file.py): nesting and size limits, one line
naming the file, for every JSON file the scripts read (issue 19, item 2)."""
import json
import os
import shutil

import pytest

import convert_checkpoint
import gpt2_generate_main
from user_files import (TINY_A, assert_one_line_error, run_in_process, snapshot,
                        tiny_models)
from utils.errors import UserError
from utils.json_file import nesting_depth, parse_json, read_json

DEEP = "[" * 200000
GREEDY = ["--decoding_strategy", "greedy", "--max_decoding_length", "8", "--prompt", "hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(str(tmp_path_factory.mktemp("models")))


def test_depth_ignores_brackets_in_strings_and_stops_early():
    assert nesting_depth('{"a": "[[[[{{", "b": [[1], {"c": "\\"]"}]}') == 3
    assert nesting_depth(DEEP, limit=10) == 11
    assert parse_json('{"x": [1, {"y": "[["}]}') == {"x": [1, {"y": "[["}]}


def test_read_json_refuses_in_one_line(tmp_path):
    cases = {"deep.json": DEEP, "bad.json": "{", "huge.json": " " * 2000,
             "latin1.json": b"{\"\xe9\": 1}", "list.json": "[1]"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError) as err:
            read_json(str(path), "test file", "fix it", max_bytes=1000, expect=dict)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, message
    os.mkfifo(tmp_path / "fifo.json")  # no writer: refused, not a hang
    with pytest.raises(UserError, match="named pipe"):
        read_json(str(tmp_path / "fifo.json"), "test file", "fix it")


def copy_hf(hf, tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(hf, target)
    return str(target)


@pytest.mark.parametrize("name", ["config.json", "vocab.json",
                                  "model.safetensors.index.json"])
def test_deep_json_in_a_hugging_face_dir(name, models, tmp_path, monkeypatch, capsys):
    _, hf = models
    model = copy_hf(hf, tmp_path)
    path = os.path.join(model, name)
    if name == "model.safetensors.index.json":  # a sharded model's index
        os.rename(os.path.join(model, "model.safetensors"),
                  os.path.join(model, "model-00001-of-00001.safetensors"))
    with open(path, "w") as f:
        f.write(DEEP)
    before = snapshot(model)
    for main, argv in ((gpt2_generate_main.main, ["--pretrain_model_dir", model, *GREEDY]),
                       (convert_checkpoint.main, [model, tmp_path / "out", "--format",
                                                  "hf"])):
        code, _, err = run_in_process(main, argv, monkeypatch, capsys)
        assert_one_line_error(code, err, path, "levels deep")
    assert snapshot(model) == before
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name", ["hparams.json", "encoder.json"])
def test_deep_json_in_an_openai_dir(name, tmp_path, monkeypatch, capsys):
    model = tmp_path / "m"
    shutil.copytree(TINY_A, model)
    if name == "encoder.json":
        shutil.copy(os.path.join(os.path.dirname(__file__), "..", "utils", "gpt2_vocab",
                                 "vocab.bpe"), model / "vocab.bpe")
    (model / name).write_text(DEEP)
    before = snapshot(model)
    code, _, err = run_in_process(gpt2_generate_main.main, [
        "--pretrain_model_dir", model, "--pretrain_checkpoint", model / "model.ckpt",
        *GREEDY], monkeypatch, capsys)
    assert_one_line_error(code, err, str(model / name), "levels deep")
    assert snapshot(model) == before


def test_metrics_log_skips_lines_it_cannot_use(tmp_path):
    from utils.training.metrics_log import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + DEEP + "\n5\n"
                    + json.dumps({"step": 9}) + "\n")
    MetricsLog(str(path), resume_step=5, enabled=True)
    assert path.read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"
