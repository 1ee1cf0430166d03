"""config_train's sample_steps and early_stopping_patience, and training on packed data."""
import json

import pytest

import prepare_data
from test_train import data_dir, model_config, train, train_config  # noqa: F401

from utils.training import trainer as training
from utils.errors import UserError
from utils.training.lm import EvalResult
from utils.training.config import load_train_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(tmp_path, data_dir, out, **overrides):  # noqa: F811
    train("--do_train", "--from_scratch", "--config_model", model_config(tmp_path),
          "--config_train", train_config(tmp_path, data_dir, **overrides),
          "--output_dir", out)


def test_sample_steps_write_seeded_samples_from_the_prompts(tmp_path, data_dir):  # noqa: F811
    prompts = ["", "The bakery"]
    for out in ("a", "b"):
        run(tmp_path, data_dir, tmp_path / out, sample_steps=2, sample_prompts=prompts)
    lines = (tmp_path / "a" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    # 6 steps: samples at steps 2, 4 and 6, one per prompt
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (s, p) for s in (2, 4, 6) for p in prompts]
    assert all(isinstance(r["text"], str) for r in rows)
    assert lines == (tmp_path / "b" / "samples.jsonl").read_text(
        encoding="utf-8").splitlines()  # the same seed, the same samples


def test_early_stopping_after_patience_evaluations_without_a_better_dev(
        tmp_path, data_dir, monkeypatch, capsys):  # noqa: F811
    perplexities = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])  # best at the 2nd evaluation

    def fake_evaluate(*args, **kwargs):
        import math
        return EvalResult(nll=math.log(next(perplexities)) * 10, tokens=10, examples=3)

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    out = tmp_path / "out"
    run(tmp_path, data_dir, out, eval_steps=1, early_stopping_patience=2)
    stdout = capsys.readouterr().out
    assert "Stopped at step 4: no better dev perplexity in 2 evaluations" in stdout
    best = training.torch.load(out / "model_best.ckpt", weights_only=True)
    assert best["step"] == 2


@pytest.mark.parametrize("overrides, words", [
    (dict(sample_steps=1.5), "sample_steps"),
    (dict(sample_prompts="text"), "sample_prompts"),
    (dict(early_stopping_patience=2, eval_steps=-1), "set eval_steps"),
])
def test_bad_new_settings_are_one_line(tmp_path, data_dir, overrides, words):  # noqa: F811
    with pytest.raises(UserError, match=words) as err:
        load_train_config(train_config(tmp_path, data_dir, **overrides))
    assert "\n" not in str(err.value)


def test_training_on_packed_windows_counts_every_token(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.txt").write_text("The river runs under the old bridge.\n\n"
                                 "Snow covers the roofs in winter.\n" * 20, encoding="utf-8")
    prepare_data.main(["--quiet", "--data_dir", str(d), "--pack", "--max_seq_length",
                       "24", "--dev_fraction", "0.2"])
    out = tmp_path / "out"
    train("--do_train", "--do_eval", "--from_scratch", "--config_model",
          model_config(tmp_path), "--config_train",
          train_config(tmp_path, d, max_train_epoch=1), "--output_dir", out)
    from utils.data.records import PreparedSplit
    dev = PreparedSplit(str(d / "dev.npy"))
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"dev"' in line][-1]
    assert record["tokens"] == dev.num_targets == int(dev.lengths.sum()) - len(dev)
