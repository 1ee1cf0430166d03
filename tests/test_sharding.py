"""shard_model = True (utils/training/sharding.py, FSDP2) on 2 CPU processes (Gloo):
the same weights (and, for Adafactor, optimizer state) as one process with the
same global batch, clipping by the global norm of the sharded gradients, exact
resume sharded and unsharded from the one ordinary .ckpt it writes, and the
refusals.

Runs under torchrun like tests/test_distributed.py; a tiny GPT-2 (width 16,
2 layers) from a random base checkpoint keeps each run to seconds.
"""
import zipfile

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_lora import HPARAMS, REPO_ROOT, base, load, train  # noqa: F401
from tests.test_train import SUBPROCESS_ENV, data_dir, train_config  # noqa: F401

from tests.tolerances import summation_tolerance, unit_roundoff
from utils.errors import UserError
from utils.model import build_model
from utils.processor import get_encoder
from utils.samples.during_training import SAMPLES_LOG, write_training_samples
from utils.training.config import load_train_config
import script_server
import sharded_save_rank

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# A max_norm well under the gradients' norm: every step is clipped, so equal
# weights need the norm of the whole (sharded) gradient.
OPTS = {
    "AdamW": {"optimizer": {"type": "AdamW", "kwargs": {"lr": 1e-2, "weight_decay": 0.01}},
              "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 0.05}}},
    "SGD": {"optimizer": {"type": "SGD", "kwargs": {"lr": 0.5, "momentum": 0.9}},
            "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 0.05}}},
    "Adafactor": {"optimizer": {"type": "Adafactor",
                                "kwargs": {"lr": 1e-2, "weight_decay": 0.01}},
                  "gradient_clip": {"type": "clip_grad_norm_", "kwargs": {"max_norm": 0.05}}},
}
# Two ranks sum gradients in another order than one process: float32 rounding
# grows with the steps, well under the 1e-4.
WEIGHT_TOL = 1e-4


def configs(tmp_path, data, opt="AdamW", **extra):
    """(one process: batch 4, two ranks sharded: batch 2 each); both with
    gradient accumulation 2, so a step covers 8 examples either way."""
    common = dict(eval_steps=-1, gradient_accumulation_steps=2, max_train_epoch=2,
                  opt=OPTS[opt], **extra)
    one = train_config(tmp_path, data, name=f"one_{opt}", train_batch_size=4, **common)
    two = train_config(tmp_path, data, name=f"two_{opt}", train_batch_size=2,
                       shard_model=True, gradient_checkpointing=True, **common)
    return one, two


def torchrun(*args):
    proc = script_server.run(
        script_server.torchrun_command(2, "gpt2_train_main.py", "--distributed", "--quiet",
                                       *args),
        cwd=REPO_ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def assert_same_model(a, b):
    assert set(a["model"]) == set(b["model"])
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=WEIGHT_TOL,
                                   msg=name)


def test_sharded_equals_one_process_and_resumes_sharded_or_not(tmp_path, data_dir, base):
    one, two = configs(tmp_path, data_dir)
    whole, part, resumed, alone = (tmp_path / n for n in ("whole", "part", "resumed",
                                                          "alone"))
    assert train("--do_train", "--checkpoint", base, "--config_train", one,
                 "--output_dir", whole) == 0
    torchrun("--do_train", "--checkpoint", base, "--config_train", two,
             "--output_dir", part, "--stop_after_steps", 1)
    saved = load(part / "model.ckpt")
    assert saved["step"] == 1 and saved["data"]["world_size"] == 2
    # An ordinary checkpoint: full tensors under their usual names.
    assert saved["model"]["decoder.self_attns.0.Q_dense.weight"].shape == (16, 16)
    assert set(saved["optimizer"]["state"]) == set(range(len(saved["model"]) - 1))
    with zipfile.ZipFile(part / "model.ckpt") as archive:
        assert archive.testzip() is None  # written record by record, CRCs and all

    out = torchrun("--do_train", "--do_eval", "--checkpoint", part / "model.ckpt",
                   "--config_train", two, "--output_dir", resumed)
    assert "dev: " in out
    assert train("--do_train", "--checkpoint", part / "model.ckpt", "--config_train", one,
                 "--output_dir", alone) == 0
    reference = load(whole / "model.ckpt")
    assert reference["step"] == 4
    assert_same_model(reference, load(resumed / "model.ckpt"))
    assert_same_model(reference, load(alone / "model.ckpt"))


def test_117m_config_shards_like_one_process(tmp_path, data_dir):
    """The issue's goal on the 117M config (GPT-2 124M's shapes, dropout off so
    that the ranks draw no masks): 2 sharded processes with the same global
    batch as 1 process reach the same weights within WEIGHT_TOL after 2
    steps from the same random start."""
    config = tmp_path / "model_117m.py"
    config.write_text("from configs.config_model_117M import n_vocab, n_ctx, n_embd, "
                      "n_head, n_layer\nfrom utils.model import gpt2_hparams\n"
                      "hparams = gpt2_hparams(n_vocab, n_ctx, n_embd, n_head, n_layer, "
                      "dropout=0.0)\n")
    one, two = configs(tmp_path, data_dir, opt="SGD")  # AdamW: the tiny model's tests
    start = ("--do_train", "--from_scratch", "--config_model", config,
             "--stop_after_steps", 2)
    assert train(*start, "--config_train", one, "--output_dir", tmp_path / "one") == 0
    torchrun(*start, "--config_train", two, "--output_dir", tmp_path / "two")
    whole, sharded = load(tmp_path / "one" / "model.ckpt"), load(tmp_path / "two" / "model.ckpt")
    assert whole["step"] == sharded["step"] == 2
    assert whole["model"]["decoder.self_attns.0.Q_dense.weight"].shape == (768, 768)
    assert_same_model(whole, sharded)


def test_sgd_and_frozen_embeddings_shard_like_one_process(tmp_path, data_dir, base):
    one, two = configs(tmp_path, data_dir, "SGD", trainable="transformer")
    assert train("--do_train", "--checkpoint", base, "--config_train", one,
                 "--output_dir", tmp_path / "one") == 0
    torchrun("--do_train", "--checkpoint", base, "--config_train", two,
             "--output_dir", tmp_path / "two")
    a, b = load(tmp_path / "one" / "model.ckpt"), load(tmp_path / "two" / "model.ckpt")
    assert_same_model(a, b)
    assert torch.equal(a["model"]["word_embedder._embedding"],
                       load(base)["model"]["word_embedder._embedding"])


def assert_same_adafactor_state(a, b):
    """The same Adafactor state (torch's layout, each tensor whole), within
    the rounding of clipping: the clip coefficient divides by the gradients'
    global norm, a float32 sum of squares over every parameter that two ranks
    add in another grouping, and second moments go with its square; so each
    value agrees within the sum's relative error bound. The key projection's
    bias gets no gradient in exact arithmetic (softmax ignores a constant added
    to all of a query's scores), so its moments are rounding noise: values are
    also allowed the float32 rounding of the largest moment."""
    assert a["optimizer_type"] == b["optimizer_type"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert set(a["optimizer"]["state"]) == set(b["optimizer"]["state"])
    states = a["optimizer"]["state"].values()
    # Adafactor's state: a (rows, 1) and a (1, columns) factor per matrix.
    terms = sum(s["row_var"].numel() * s["col_var"].numel() if "row_var" in s
                else s["variance"].numel() for s in states)
    rtol = summation_tolerance(torch.float32, terms)
    atol = unit_roundoff(torch.float32) * max(float(t.abs().max()) for s in states
                                              for n, t in s.items() if n != "step")
    for key, fields in a["optimizer"]["state"].items():
        assert set(fields) == set(b["optimizer"]["state"][key]), key
        for field, tensor in fields.items():
            torch.testing.assert_close(b["optimizer"]["state"][key][field], tensor,
                                       rtol=rtol, atol=atol,
                                       msg=lambda m: f"{key} {field}: {m}")


def test_adafactor_shards_like_one_process_and_resumes_unsharded(tmp_path, data_dir, base):
    """Adafactor's factored state is kept whole on every rank: two ranks step
    like one process (weights and state, every step clipped), and checkpoints
    in torch's Adafactor layout continue across the two, sharded or not, like
    the uninterrupted one-process run."""
    one, two = configs(tmp_path, data_dir, "Adafactor")
    whole, one_part, part, alone, sharded = (
        tmp_path / n for n in ("whole", "one_part", "part", "alone", "sharded"))
    assert train("--do_train", "--checkpoint", base, "--config_train", one,
                 "--output_dir", whole) == 0
    assert train("--do_train", "--checkpoint", base, "--config_train", one,
                 "--output_dir", one_part, "--stop_after_steps", 2) == 0
    torchrun("--do_train", "--checkpoint", base, "--config_train", two,
             "--output_dir", part, "--stop_after_steps", 2)
    a, b = load(one_part / "model.ckpt"), load(part / "model.ckpt")
    assert b["step"] == 2 and b["optimizer_type"] == "Adafactor"
    assert_same_model(a, b)
    assert_same_adafactor_state(a, b)
    # Factored, and whole rather than one rank's part: a (rows, 1) and a
    # (1, columns) vector per matrix, the embedding's with every token's row.
    factored = [s for s in b["optimizer"]["state"].values() if "row_var" in s]
    assert all(s["row_var"].shape[1] == 1 and s["col_var"].shape[0] == 1 for s in factored)
    vocab, width = b["model"]["word_embedder._embedding"].shape
    assert ((vocab, 1), (1, width)) in [(s["row_var"].shape, s["col_var"].shape)
                                        for s in factored]

    # The sharded checkpoint resumed in one process, and the one-process
    # checkpoint resumed on two ranks (each loads the whole state).
    assert train("--do_train", "--checkpoint", part / "model.ckpt", "--config_train", one,
                 "--output_dir", alone) == 0
    torchrun("--do_train", "--checkpoint", one_part / "model.ckpt", "--config_train", two,
             "--output_dir", sharded)
    reference = load(whole / "model.ckpt")
    for resumed in (load(alone / "model.ckpt"), load(sharded / "model.ckpt")):
        assert reference["step"] == resumed["step"] == 4
        assert_same_model(reference, resumed)
        assert_same_adafactor_state(reference, resumed)


def test_samples_and_do_test_decode_the_gathered_model(tmp_path, data_dir, base):
    """sample_steps and --do_test in a sharded run decode a whole copy gathered
    on rank 0: the same text as decoding the run's model.ckpt in one process."""
    prompts = ["The", ""]
    _, two = configs(tmp_path, data_dir, sample_steps=2, sample_prompts=prompts)
    run = tmp_path / "run"
    torchrun("--do_train", "--do_test", "--checkpoint", base, "--config_train", two,
             "--output_dir", run)
    saved = load(run / "model.ckpt")
    assert saved["step"] == 4
    lines = (run / SAMPLES_LOG).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * len(prompts)  # steps 2 and 4
    model = build_model(HPARAMS)
    model.load_state_dict(saved["model"])
    write_training_samples(model, get_encoder(), prompts, step=4, seed=3,
                           max_decoding_length=20, output_dir=str(tmp_path))
    assert lines[-len(prompts):] == (tmp_path / SAMPLES_LOG).read_text(
        encoding="utf-8").splitlines()

    assert train("--do_test", "--checkpoint", run / "model.ckpt", "--config_train", two,
                 "--output_dir", tmp_path / "alone") == 0
    sharded = (run / "test_samples.tsv").read_text(encoding="utf-8")
    assert sharded and sharded == (tmp_path / "alone" / "test_samples.tsv").read_text(
        encoding="utf-8")


def test_shard_model_refusals(tmp_path, data_dir, base):
    _, two = configs(tmp_path, data_dir)
    with pytest.raises(UserError, match="launch with torchrun or mpirun and --distributed"):
        train("--do_train", "--checkpoint", base, "--config_train", two,
              "--output_dir", tmp_path / "x")
    with pytest.raises(UserError, match="shard_model = 1 .* must be True or False"):
        load_train_config(train_config(tmp_path, data_dir, name="t", shard_model=1))


def test_sharded_save_gathers_one_tensor_at_a_time(tmp_path):
    """The .ckpt of a 2-rank sharded model and AdamW state holds the gathered
    tensors, and rank 0 never held two of them at once (the issue: never more
    than the model plus one block)."""
    mp.spawn(sharded_save_rank.save_on_two_ranks,
             args=(str(tmp_path / "store"), str(tmp_path / "s.ckpt")), nprocs=2)
    assert load(tmp_path / "s.ckpt")["model"]["decoder.self_attns.0.Q_dense.weight"].shape == (
        16, 16)
