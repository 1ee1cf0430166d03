"""OpenAI TF checkpoints -> texar GPT2Decoder, checked against transformers' logits.

The fixtures under tests/fixtures/tf_gpt2 were written by real TensorFlow and
their reference logits computed by Hugging Face transformers' own GPT-2 (see
that folder's README): neither is our code.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from utils.checkpoints.openai_weights import load_openai_weights
from utils.checkpoints.weights import (ensure_openai_files, checkpoint_model_fields,
                                       load_checkpoint, load_weights, resolve_model,
                                       save_checkpoint)
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams, hparams_from_openai



def load_model(**flags):
    """Resolve, then load: what the scripts do with their weight flags."""
    return load_weights(resolve_model(**flags))


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf_gpt2")
MODELS = ("tiny_a", "tiny_b")


def model_dir(name):
    return os.path.join(FIXTURES, "models", name)


def reference(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        meta = json.load(f)
    arrays = np.load(os.path.join(FIXTURES, "reference", name + ".npz"),
                     allow_pickle=False)
    return meta, arrays


def logits_of(model, ids):
    with torch.no_grad():
        out = model(inputs=torch.tensor([ids]), decoding_strategy="train_greedy")
    return out.logits[0].numpy()


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_reference_implementation(name):
    meta, ref = reference(name)
    loaded = load_model(pretrain_model_dir=model_dir(name), download=False)
    assert loaded.hparams == hparams_from_openai(meta["hparams"])
    vocab_ids = ref["vocab_ids"]
    for row, length in enumerate(ref["lengths"]):
        ids = ref["input_ids"][row, :length].tolist()
        logits = logits_of(loaded.model, ids)
        np.testing.assert_allclose(logits[:, vocab_ids],
                                   ref["logits_at_vocab_ids"][row, :length],
                                   atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits[-1], ref["logits_last"][row],
                                   atol=1e-4, rtol=0)
        log_z = torch.logsumexp(torch.from_numpy(logits).double(), -1).numpy()
        np.testing.assert_allclose(log_z, ref["logsumexp"][row, :length],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_dev_nll_equals_reference(name):
    meta, _ = reference(name)
    model = load_model(pretrain_model_dir=model_dir(name), download=False).model
    for ids, want in zip(meta["dev_nll"]["sequences"], meta["dev_nll"]["nll"]):
        logits = torch.from_numpy(logits_of(model, ids)).double()
        nll = torch.nn.functional.cross_entropy(
            logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        assert float(nll) == pytest.approx(want, rel=1e-6)


def test_every_parameter_is_assigned_from_the_checkpoint():
    """Poison every parameter first: loading must overwrite all of them."""
    meta, _ = reference("tiny_b")
    model = build_model(hparams_from_openai(meta["hparams"]))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    load_openai_weights(model, os.path.join(model_dir("tiny_b"), "model.ckpt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # The output layer is the token embedding (tied), as in GPT-2.
    assert model.decoder._output_layer.weight is model.word_embedder._embedding


def test_wrong_depth_lists_missing_and_unassigned_names():
    model = build_model(gpt2_hparams(50257, 32, 8, 2, 3))  # tiny_a has 2 layers
    with pytest.raises(UserError) as err:
        load_openai_weights(model, os.path.join(model_dir("tiny_a"), "model.ckpt"))
    message = str(err.value)
    assert "missing from the checkpoint: model/h2/" in message
    assert "\n" not in message


def test_wrong_width_lists_misshaped_names():
    model = build_model(gpt2_hparams(50257, 32, 16, 2, 2))  # tiny_a is 8 wide
    with pytest.raises(UserError, match="mis-shaped: .*model/wte"):
        load_openai_weights(model, os.path.join(model_dir("tiny_a"), "model.ckpt"))


def test_fewer_layers_lists_unexpected_names():
    model = build_model(gpt2_hparams(50257, 48, 12, 3, 2))  # tiny_b has 3 layers
    with pytest.raises(UserError, match="unexpected in the checkpoint: model/h2/"):
        load_openai_weights(model, os.path.join(model_dir("tiny_b"), "model.ckpt"))


def test_config_that_disagrees_with_hparams_json_names_both_values(tmp_path):
    config = tmp_path / "wide.py"
    config.write_text("from utils.model import gpt2_hparams\n"
                      "hparams = gpt2_hparams(50257, 32, 16, 2, 2)\n")
    with pytest.raises(UserError, match=r"n_embd=16 in .*wide.py but 8 in .*hparams.json"):
        load_model(config_model=str(config), pretrain_model_dir=model_dir("tiny_a"),
                   download=False)


def test_matching_config_is_accepted(tmp_path):
    config = tmp_path / "same.py"
    config.write_text("from utils.model import gpt2_hparams\n"
                      "hparams = gpt2_hparams(50257, 32, 8, 2, 2)\n")
    load_model(config_model=str(config), pretrain_model_dir=model_dir("tiny_a"),
               download=False)


def test_checkpoint_prefix_given_directly_and_as_index_file():
    prefix = os.path.join(model_dir("tiny_a"), "model.ckpt")
    for given in (prefix, prefix + ".index"):
        loaded = load_model(pretrain_checkpoint=given, download=False)
        assert "tiny_a" in loaded.source


def test_missing_model_directory_without_download_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="download_model.sh"):
        load_model(pretrain_model_dir=str(tmp_path / "model_117M"), download=False)


def test_corrupt_hparams_json_is_a_user_error(tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model_dir("tiny_a"), broken)
    (broken / "hparams.json").write_text("{not json")
    with pytest.raises(UserError, match="hparams.json"):
        load_model(pretrain_model_dir=str(broken), download=False)


# --- our own checkpoints ---------------------------------------------------

def test_finetuned_checkpoint_round_trip_and_precedence(tmp_path):
    hparams = gpt2_hparams(50257, 16, 8, 2, 1)
    model = build_model(hparams)
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": model.state_dict(),
                           **checkpoint_model_fields(hparams), "step": 7})
    # --checkpoint wins over a pre-trained checkpoint that does not even exist.
    loaded = load_model(checkpoint=path,
                        pretrain_checkpoint=str(tmp_path / "absent" / "model.ckpt"))
    ids = [50256, 15496, 995]
    np.testing.assert_array_equal(logits_of(loaded.model, ids), logits_of(model.eval(), ids))
    assert load_checkpoint(path)["step"] == 7


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.ckpt"
    torch.save({"model": {}, "payload": Sneaky()}, path)
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        load_checkpoint(str(path))


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = str(tmp_path / "model.ckpt")
    model = build_model(gpt2_hparams(50257, 16, 8, 2, 1))
    save_checkpoint(path, {"model": model.state_dict()})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(path)


def test_missing_checkpoint_points_tf_checkpoints_elsewhere():
    prefix = os.path.join(model_dir("tiny_a"), "model.ckpt")
    with pytest.raises(UserError, match="--pretrain_checkpoint"):
        load_checkpoint(prefix)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": {}, "version": 1})

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}, "version": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 1
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_checkpoint_whose_weights_do_not_fit_its_hparams(tmp_path):
    model = build_model(gpt2_hparams(50257, 16, 8, 2, 1))
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": model.state_dict(),
                           **checkpoint_model_fields(gpt2_hparams(50257, 16, 8, 2, 2))})
    with pytest.raises(UserError, match=r"missing: decoder\.poswise_layer_norm\.1\.bias.* and \d+ more"):
        load_model(checkpoint=path)


def test_checkpoint_whose_model_is_not_named_tensors_is_a_user_error(tmp_path):
    path = str(tmp_path / "odd.ckpt")
    torch.save({"model": [1, 2, 3]}, path)
    with pytest.raises(UserError, match="named tensors"):
        load_checkpoint(path)


def test_hparams_json_with_bad_values_is_a_user_error(tmp_path):
    for key, value in (("n_ctx", "32a"), ("n_head", 0)):
        broken = tmp_path / f"model_{key}"
        shutil.copytree(model_dir("tiny_a"), broken)
        hparams = json.loads((broken / "hparams.json").read_text())
        hparams[key] = value
        (broken / "hparams.json").write_text(json.dumps(hparams))
        with pytest.raises(UserError, match=key):
            load_model(pretrain_model_dir=str(broken), download=False)


def test_incomplete_model_config_is_a_user_error(tmp_path):
    config = tmp_path / "partial.py"
    config.write_text('hparams = {"vocab_size": 50257}\n')
    with pytest.raises(UserError, match="not a complete"):
        load_model(config_model=str(config), pretrain_model_dir=model_dir("tiny_a"),
                   download=False)


def test_a_training_checkpoint_is_read_once_for_weights_and_training_state(
        tmp_path, monkeypatch):
    hparams = gpt2_hparams(50257, 16, 8, 2, 1)
    model = build_model(hparams)
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": model.state_dict(), **checkpoint_model_fields(hparams),
                           "optimizer": {"state": {}}, "step": 3})
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    resolved = resolve_model(checkpoint=path)
    assert resolved.training_state["step"] == 3 and "model" not in resolved.training_state
    loaded = load_weights(resolved)
    assert len(reads) == 1
    assert resolved.model_state is None  # the model holds the only copy
    ids = [50256, 15496, 995]
    np.testing.assert_array_equal(logits_of(loaded.model, ids), logits_of(model.eval(), ids))


def test_weights_only_checkpoint_has_no_training_state(tmp_path):
    hparams = gpt2_hparams(50257, 16, 8, 2, 1)
    path = str(tmp_path / "weights.ckpt")
    save_checkpoint(path, {"model": build_model(hparams).state_dict(),
                           **checkpoint_model_fields(hparams)})
    assert resolve_model(checkpoint=path).training_state is None


@pytest.mark.parametrize("folder,name", [
    ("gpt2_pretrained_models/model_124M", "117M"), ("model_gpt2-medium", "345M"),
    ("models/774M/", "774M"), ("model_2B", None), ("my_model", None)])
def test_checkpoint_loading_reads_a_released_name_from_the_folder(folder, name):
    from utils.checkpoints.openai_files import model_name_of_dir
    assert model_name_of_dir(folder, prefix_optional=True) == name


def test_a_released_folder_fetches_again_what_fails_its_check(tmp_path, monkeypatch):
    """An HTML page saved as hparams.json and a weights file cut short, left by
    an earlier tool in gpt2_pretrained_models/model_117M, are downloaded again
    (from a real local server), not trusted; the model then loads."""
    from model_server import Server
    from test_model_files import BIG, PORTAL, make_files, write_model
    files = make_files()
    server = Server(files)
    try:
        monkeypatch.setenv("GPT2_DOWNLOAD_BASE_URL", server.url)
        monkeypatch.setenv("GPT2_DOWNLOAD_BACKOFF", "0")
        model_dir = tmp_path / "model_117M"
        write_model(model_dir, {**files, "hparams.json": PORTAL, BIG: files[BIG][:100]})
        resolved = resolve_model(pretrain_model_dir=str(model_dir))
        assert resolved.sizes == json.loads(files["hparams.json"])
        assert [path for path, _ in server.requests] == ["/124M/hparams.json"]
        ensure_openai_files(resolved.path, download=True)
        assert (model_dir / BIG).read_bytes() == files[BIG]
        assert [path for path, _ in server.requests][1:] == [f"/124M/{BIG}"]
        # Whole files are not fetched again.
        ensure_openai_files(resolved.path, download=True)
        assert len(server.requests) == 2
    finally:
        server.close()
