"""Issue 21, the newcomer's path, as command lines run in-process: training
from flags alone over the config (settings printed with their source, typos
named), the sequence length read from prepared.json, log lines with
step N/TOTAL, elapsed and ETA, a resume line whose epoch agrees with the log,
--do_test's source column as the user wrote it, and the small defects (the
hf:NAME message cut at a word, --help examples on their own lines)."""
import json
import os
import re
import sys
import types

import pytest
import torch

import gpt2_generate_main
import gpt2_train_main
import prepare_data
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TRAIN_LINES = ["The bakery opens at six every morning.",
               "Fishing boats return when the tide comes in.",
               "Sheep graze on the hills.", "Snow covers the rooftops in winter.",
               "The market sells cheese, honey and eggs.",
               "Trains leave for the city every hour."]
DEV_LINES = ["The bakery sells fresh bread.", "Snow falls."]
# Model: 2 layers of width 16 (fast on one thread).
TINY_MODEL = ("from utils.model import gpt2_hparams\n"
              "hparams = gpt2_hparams(50257, 32, 16, 2, 2, dropout=0.0)\n")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def text_dir(tmp_path):
    """A prepared .txt data dir (max_seq_length 24) and a tiny model config."""
    d = tmp_path / "my_text"
    d.mkdir()
    write_lines(d / "train.txt", TRAIN_LINES)
    write_lines(d / "dev.txt", DEV_LINES)
    prepare_data.main(["--quiet", "--data_dir", str(d), "--max_seq_length", "24"])
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    return d


def train(tmp_path, *args):
    return gpt2_train_main.main(["--quiet", "--from_scratch", "--config_model",
                                 str(tmp_path / "tiny.py"), *map(str, args)])


def settings_table(out):
    """{setting: (value text, source)} from a run's first lines."""
    table = {}
    for line in out.split("\n"):
        match = re.match(r"^  (\w+) += (.+)  \((.+)\)$", line)
        if match:
            table[match.group(1)] = (match.group(2), match.group(3))
    return table


def test_prepare_data_records_its_settings(text_dir):
    info = json.loads((text_dir / "prepared.json").read_text())
    assert info["max_seq_length"] == 24 and info["pack"] is False
    assert info["conditional"] is False and info["splits"] == ["train", "dev"]
    assert info["text_dir"] == os.path.abspath(text_dir)


def test_training_from_flags_alone(tmp_path, text_dir, capsys):
    out_dir = tmp_path / "my_out"
    assert train(tmp_path, "--do_train", "--data_dir", text_dir, "--max_steps", 3,
                 "--lr", 2e-3, "--train_batch_size", 2, "--set", "display_steps=1",
                 "--set", "eval_steps=-1", "--set", "sample_prompts=['', 'Snow']",
                 "--output_dir", out_dir) == 0

    out = capsys.readouterr().out
    table = settings_table(out)
    assert table["data_dir"] == (repr(str(text_dir)), "flag")
    assert table["max_seq_length"] == ("24", f"data ({text_dir / 'prepared.json'})")
    assert table["max_steps"] == ("3", "flag")
    assert table["lr"] == ("0.002", "flag")
    assert table["train_batch_size"] == ("2", "flag")
    assert table["sample_prompts"] == ("['', 'Snow']", "flag")
    assert table["max_train_epoch"] == ("100", "config file")
    assert table["min_lr_ratio"][1] == "config file"
    assert table["max_decoding_length"] == ("24", "max_seq_length")
    # The settings come first.
    assert out.index("Settings of this run") < out.index("step 1/3")
    # max_steps decides the total (3, not 100 epochs' worth), lines carry the time.
    steps = re.findall(r"^step (\d+)/(\d+) \| epoch ([\d.]+) .*\| elapsed (\d+:\d\d:\d\d)"
                       r" \| ETA (\d+:\d\d:\d\d)$", out, re.M)
    assert [(s, t) for s, t, *_ in steps] == [("1", "3"), ("2", "3"), ("3", "3")], out
    assert steps[-1][4] == "0:00:00"
    assert "3 steps in all (max_steps 3)" in out and "Training done: 3 steps in" in out
    state = torch.load(out_dir / "model.ckpt", weights_only=True)
    assert state["step"] == 3 and state["schedule"]["total_steps"] == 3
    assert state["config"]["opt"]["optimizer"]["kwargs"]["lr"] == 2e-3
    assert state["config"]["max_steps"] == 3


def test_a_misspelt_setting_is_named(tmp_path, text_dir):
    with pytest.raises(UserError, match=r"--set warmup_step: no such training setting "
                                        r"\(did you mean warmup_steps\?\)"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--set", "warmup_step=3")
    with pytest.raises(UserError, match=r"write --set key=value"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--set", "warmup_steps")
    with pytest.raises(UserError, match=r"--max_steps and --set max_steps= are both"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--max_steps", 2,
              "--set", "max_steps=3")
    with pytest.raises(UserError, match=r"--lr and --set lr= are both given"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--lr", 1e-3,
              "--set", "lr=2e-3")
    # A value that is no number where one is needed: the config's own check.
    with pytest.raises(UserError, match=r"warmup_steps = 'many' in training config"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--set", "warmup_steps=many")
    assert not (tmp_path / "output").exists()


def test_a_length_unlike_the_datas_is_one_line(tmp_path, text_dir, capsys):
    with pytest.raises(UserError) as err:
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--max_seq_length", 32)
    message = str(err.value)
    assert message.startswith(f"--max_seq_length but {text_dir} was prepared with "
                              f"max_seq_length 24 ({text_dir / 'prepared.json'})")
    assert "leave --max_seq_length out" in message and "--max_seq_length 32" in message
    # In a config file, the fix names the config.
    config = tmp_path / "mine.py"
    config.write_text(open("configs/config_train.py").read()
                      .replace("max_seq_length = None", "max_seq_length = 64"))
    with pytest.raises(UserError, match=r"max_seq_length = 64 in .*mine\.py but .* "
                                        r"set max_seq_length = None in"):
        train(tmp_path, "--do_train", "--data_dir", text_dir, "--config_train", config)


def test_resume_line_agrees_with_the_log(tmp_path, text_dir, capsys):
    out_dir = tmp_path / "run"
    common = ("--data_dir", text_dir, "--train_batch_size", 4, "--max_train_epoch", 3,
              "--set", "display_steps=1", "--set", "eval_steps=-1",
              "--output_dir", out_dir)
    assert train(tmp_path, "--do_train", *common, "--stop_after_steps", 3) == 0
    first = capsys.readouterr().out
    # 6 examples in batches of 4: 2 steps an epoch, so step 3 is 1.5 epochs in.
    assert "step 3/3 | epoch 1.50 |" in first
    assert "6 steps in all (3 epochs); stopping at step 3 (--stop_after_steps)" in first
    assert train(tmp_path, "--do_train", *common, "--checkpoint",
                 out_dir / "model.ckpt") == 0
    second = capsys.readouterr().out
    assert "resuming at step 3 (epoch 1.50)" in second
    assert "step 4/6 | epoch 2.00 |" in second and "step 6/6 | epoch 3.00 |" in second


def test_do_test_shows_the_source_as_given(tmp_path, capsys):
    d = tmp_path / "qa"
    d.mkdir()
    long_source = ("Tell me, after all the long and winding explanations that came "
                   "before, what sound does a dog make?")
    write_lines(d / "train.tsv", ["What sound does a cat make?\tMeow.",
                                  "What sound does a cow make?\tMoo."])
    write_lines(d / "test.tsv", ["What sound does a cow make?\tMoo.",
                                 f"{long_source}\tWoof."])
    prepare_data.main(["--quiet", "--data_dir", str(d), "--max_seq_length", "16"])
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    assert train(tmp_path, "--do_train", "--do_test", "--data_dir", d,
                 "--max_steps", 1, "--set", "eval_steps=-1",
                 "--decoding_strategy", "greedy", "--max_decoding_length", 20,
                 "--output_dir", tmp_path / "out") == 0
    out = capsys.readouterr().out
    rows = [line.split("\t") for line in
            (tmp_path / "out" / "test_samples.tsv").read_text().splitlines()]
    assert [row[0] for row in rows] == ["What sound does a cow make?", long_source]
    assert [row[2] for row in rows] == ["Moo.", "Woof."]
    assert ("note: 1 of 2 test sources did not fit in max_seq_length 16 beside their "
            "target: the model saw only their end; test_samples.tsv shows them whole"
            in out)


def test_hub_message_is_cut_at_a_word(monkeypatch):
    from utils.checkpoints.hf_hub import fetch_hub_model
    hub = types.ModuleType("huggingface_hub")
    hub.constants = types.SimpleNamespace(HF_HUB_OFFLINE=True)

    def snapshot_download(*args, **kwargs):
        raise OSError("We couldn't connect to the hub and could not find the files "
                      "in the cache on the local disk. Please check your connection "
                      "or try again later, and make sure the name is right.")
    hub.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    with pytest.raises(UserError) as err:
        fetch_hub_model("hf:openai-community/gpt2", weights=True)
    message = str(err.value)
    reason = message[message.index("(OSError: ") + 10:message.index("); ")]
    assert reason.endswith(" ...") and reason[:-4].split()[-1] in \
        snapshot_download.__code__.co_consts[1].split()
    assert "huggingface-cli download openai-community/gpt2 --local-dir" in message


def test_help_examples_are_whole_commands(capsys):
    with pytest.raises(SystemExit):
        gpt2_generate_main.parse_args(["--help"])
    text = capsys.readouterr().out
    for line in text.split("\n"):
        if "python gpt2_generate_main.py" in line:
            command = line[line.index("python"):]
            assert "  " not in command, line  # no continuation folded into spaces
    assert "--prompt_file prompts.txt \\\n" in text
