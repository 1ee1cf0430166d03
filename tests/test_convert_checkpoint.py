"""convert_checkpoint.py: OpenAI <-> Hugging Face <-> our .ckpt, checked against
references we did not write.

- Every hop of OpenAI -> HF -> OpenAI -> ckpt -> HF keeps every tensor equal to
  the sha256 TensorFlow computed of the fixture's variables
  (tests/fixtures/tf_gpt2/reference), each hop's files read by a reader other
  than the writer where one exists (the safetensors package, torch.load).
- The HF export loads in transformers (model and tokenizer) with our logits.
- The OpenAI export is read by our reader and, when installed, by TensorFlow.
- A model fine-tuned by gpt2_train_main.py opens in transformers after one
  command (the issue's "Done when").
- Bad input and existing DSTs: one line each, DST left as it was.
"""
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers  # a test dependency (requirements-test.txt)
from safetensors.torch import load_file

import convert_checkpoint
from utils.errors import UserError
from utils.checkpoints.hf_names import openai_of_hf, texar_to_hf_tensors
from utils.checkpoints.tf_reader import TFCheckpointReader
from utils.checkpoints.weights import load_weights, resolve_model
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
TINY_A = os.path.join(FIXTURES, "models", "tiny_a")
IDS = torch.tensor([[50256, 15496, 995, 11, 262, 2068, 7586, 21831, 0, 50000]])
HF_FILES = ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
            "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
OPENAI_FILES = ["checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe"]


def tensorflow_sha256(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json"), encoding="utf-8") as f:
        return {n: t["sha256"] for n, t in json.load(f)["tensors"].items()}


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def openai_hashes_of_hf(hf_state):
    out = {}
    for name, tensor in hf_state.items():
        if name != "lm_head.weight":
            tf_name, value = openai_of_hf(name, tensor)
            out[tf_name] = sha256(value.numpy())
    return out


def hashes(path, fmt):
    """sha256 of every tensor under OpenAI's names and shapes, read back."""
    if fmt == "hf":  # by the safetensors package, not by our reader
        return openai_hashes_of_hf(load_file(os.path.join(path, "model.safetensors")))
    if fmt == "ckpt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        n_layer = state["model_sizes"]["n_layer"]
        return openai_hashes_of_hf(dict(texar_to_hf_tensors(state["model"], n_layer)))
    with TFCheckpointReader(os.path.join(path, "model.ckpt")) as reader:
        return {n: sha256(reader.read(n)) for n in reader.variables()}


def write_train_config(tmp_path, data_dir, max_seq_length=16):
    """A few steps of training on a tiny data set."""
    settings = dict(data_dir=str(data_dir), max_seq_length=max_seq_length,
                    train_batch_size=2, eval_batch_size=2, test_batch_size=2,
                    max_train_epoch=1, display_steps=1, eval_steps=-1, checkpoint_steps=-1,
                    warmup_steps=1, seed=1,
                    opt={"optimizer": {"type": "AdamW", "kwargs": {"lr": 3e-3}}})
    path = tmp_path / "train_cfg.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return path


def convert(*args):
    return convert_checkpoint.main([str(a) for a in args])


def one_line_error(capsys, args, *needles):
    """The CLI's user error: exit 2, exactly one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        from utils.errors import run_main
        run_main(lambda: convert(*args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------ round trips

def test_round_trip_keeps_every_tensor_tensorflows(tmp_path, capsys):
    reference = tensorflow_sha256("tiny_a")
    hops = [(TINY_A, None), (tmp_path / "hf", "hf"), (tmp_path / "openai", "openai"),
            (tmp_path / "model.ckpt", "ckpt"), (tmp_path / "hf_again", "hf")]
    for (src, _), (dst, fmt) in zip(hops, hops[1:]):
        assert convert(src, dst, "--format", fmt) == 0
        assert hashes(dst, fmt) == reference, f"{src} -> {dst}"
        summary = capsys.readouterr().out
        assert summary.startswith(f"Wrote {dst} ({fmt}):") and "file(s)" in summary
    assert sorted(os.listdir(tmp_path / "hf")) == HF_FILES
    assert sorted(os.listdir(tmp_path / "openai")) == OPENAI_FILES
    with open(tmp_path / "openai" / "hparams.json", encoding="utf-8") as f:
        assert json.load(f) == {"n_vocab": 50257, "n_ctx": 32, "n_embd": 8, "n_head": 2,
                                "n_layer": 2}
    same = [(tmp_path / "hf" / n).read_bytes() == (tmp_path / "hf_again" / n).read_bytes()
            for n in HF_FILES]
    assert all(same)


def test_hf_export_loads_in_transformers_with_our_logits(tmp_path):
    assert convert(TINY_A, tmp_path / "hf", "--format", "hf") == 0
    ours = load_weights(resolve_model(pretrain_model_dir=TINY_A, download=False)).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, ours(inputs=IDS).logits, atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    from utils.processor import get_encoder
    text = "Hello world, héllo 🙂 <|endoftext|>"
    assert tokenizer(text)["input_ids"] == get_encoder().encode(text, allow_special=True)


def test_openai_export_is_read_by_our_reader_and_by_tensorflow(tmp_path):
    assert convert(TINY_A, tmp_path / "hf", "--format", "hf") == 0
    assert convert(tmp_path / "hf", tmp_path / "openai", "--format", "openai") == 0
    with TFCheckpointReader(str(tmp_path / "openai" / "model.ckpt")) as ours, \
            TFCheckpointReader(os.path.join(TINY_A, "model.ckpt")) as fixture:
        assert ours.variables() == fixture.variables()  # names, dtypes, shapes
        for name in fixture.variables():
            assert np.array_equal(ours.read(name), fixture.read(name)), name
    tf = pytest.importorskip("tensorflow")  # never in the project's venv
    theirs = tf.train.load_checkpoint(str(tmp_path / "openai"))
    for name, digest in tensorflow_sha256("tiny_a").items():
        value = theirs.get_tensor(name)
        assert value.dtype == np.float32 and sha256(value) == digest, name


def test_fine_tuned_checkpoint_opens_in_transformers_after_one_command(tmp_path):
    """The issue's "Done when": train, convert, from_pretrained."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("The bakery opens at six.\nBoats come in.\n" * 4)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(*cmd):
        proc = script_server.run([sys.executable, *map(str, cmd)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    run("prepare_data.py", "--quiet", "--data_dir", data, "--max_seq_length", "16")
    run("gpt2_train_main.py", "--do_train", "--quiet", "--pretrain_model_dir", TINY_A,
        "--config_train", write_train_config(tmp_path, data), "--output_dir", tmp_path / "out")
    ckpt = tmp_path / "out" / "model.ckpt"
    run("convert_checkpoint.py", ckpt, tmp_path / "hf", "--format", "hf")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours = load_weights(resolve_model(checkpoint=str(ckpt))).model
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, ours(inputs=IDS).logits, atol=1e-5, rtol=0)
    assert hashes(ckpt, "ckpt") != tensorflow_sha256("tiny_a")  # it did train


def test_ckpt_export_loads_with_checkpoint_flag(tmp_path):
    assert convert(TINY_A, tmp_path / "m.ckpt", "--format", "ckpt") == 0
    resolved = resolve_model(checkpoint=str(tmp_path / "m.ckpt"))
    assert resolved.training_state is None  # weights only
    ours = load_weights(resolved).model
    reference = load_weights(resolve_model(pretrain_model_dir=TINY_A, download=False)).model
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_vocabulary_goes_along(tmp_path):
    """A Hugging Face source's own vocabulary reaches the OpenAI export as
    encoder.json/vocab.bpe; a .ckpt takes --vocab_dir's."""
    assert convert(TINY_A, tmp_path / "hf", "--format", "hf") == 0
    vocab = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    assert convert(tmp_path / "hf", tmp_path / "openai", "--format", "openai") == 0
    assert json.loads((tmp_path / "openai" / "encoder.json").read_text("utf-8")) == vocab
    assert convert(tmp_path / "openai", tmp_path / "m.ckpt", "--format", "ckpt") == 0
    assert convert(tmp_path / "m.ckpt", tmp_path / "hf2", "--format", "hf",
                   "--vocab_dir", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf2" / "vocab.json").read_text("utf-8")) == vocab


# ------------------------------------------------------------------ DST

def test_existing_dst_is_refused_and_force_replaces_only_its_files(tmp_path, capsys):
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    one_line_error(capsys, [TINY_A, dst, "--format", "hf"], "is not empty", "--force")
    assert os.listdir(dst) == ["notes.txt"]
    assert convert(TINY_A, dst, "--format", "hf", "--force") == 0
    assert sorted(os.listdir(dst)) == sorted(HF_FILES + ["notes.txt"])
    assert (dst / "notes.txt").read_text() == "mine"
    # A model of the other format in DST: refused even with --force.
    one_line_error(capsys, [TINY_A, dst, "--format", "openai", "--force"],
                   "holds a model in hf format (config.json)")
    (tmp_path / "m.ckpt").write_bytes(b"old")
    one_line_error(capsys, [TINY_A, tmp_path / "m.ckpt", "--format", "ckpt"], "exists",
                   "--force")
    assert convert(TINY_A, tmp_path / "m.ckpt", "--format", "ckpt", "--force") == 0
    one_line_error(capsys, [TINY_A, tmp_path, "--format", "ckpt"], "is a directory")
    one_line_error(capsys, [dst, dst, "--format", "hf", "--force"], "is SRC itself")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".converting")]


def test_a_failure_part_way_leaves_dst_as_it_was(tmp_path, capsys):
    """A tensor missing from SRC is only found at the end of the stream."""
    src = tmp_path / "src"
    assert convert(TINY_A, src, "--format", "hf") == 0
    state = load_file(str(src / "model.safetensors"))
    del state["transformer.h.1.mlp.c_proj.bias"]
    from safetensors.torch import save_file
    save_file(state, str(src / "model.safetensors"))
    for fmt in ("hf", "openai"):
        one_line_error(capsys, [src, tmp_path / fmt, "--format", fmt],
                       "lacks 1 weight(s)", "transformer.h.1.mlp.c_proj.bias")
        assert not os.path.exists(tmp_path / fmt)
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, [src, tmp_path / "empty", "--format", "hf"], "lacks 1 weight")
    assert os.listdir(tmp_path / "empty") == []
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".converting")]


# ------------------------------------------------------------------ bad SRC

def test_unrecognised_src_says_what_it_holds(tmp_path, capsys):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.npz").write_bytes(b"x")
    one_line_error(capsys, [tmp_path / "odd", tmp_path / "out", "--format", "hf"],
                   "neither an OpenAI GPT-2 model", "it holds weights.npz")
    one_line_error(capsys, [tmp_path / "nope", tmp_path / "out", "--format", "hf"],
                   "does not exist")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    one_line_error(capsys, [tmp_path / "text.ckpt", tmp_path / "out", "--format", "hf"],
                   "cannot read checkpoint")
    assert not os.path.exists(tmp_path / "out")


def test_bad_hf_sources_are_one_line_each(tmp_path, capsys):
    good = tmp_path / "good"
    assert convert(TINY_A, good, "--format", "hf") == 0

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    def set_config(d, **fields):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **fields}))

    cases = [
        (variant("llama", lambda d: set_config(d, model_type="llama")),
         "model_type='llama'"),
        (variant("relu", lambda d: set_config(d, activation_function="relu")),
         "activation_function='relu' cannot be loaded"),
        (variant("missing", lambda d: os.remove(d / "model.safetensors")),
         "has config.json but no model.safetensors"),
        (variant("truncated", lambda d: (d / "model.safetensors").write_bytes(
            (good / "model.safetensors").read_bytes()[:5000])),
         "not a readable safetensors file"),
        (variant("wider", lambda d: set_config(d, n_embd=16)),
         "c_attn.bias has shape [24] but config.json's sizes need [48]"),
    ]
    for src, needle in cases:
        one_line_error(capsys, [src, tmp_path / "out", "--format", "openai"], needle)
    assert not os.path.exists(tmp_path / "out")


def test_mismatched_ckpt_shapes_are_one_line(tmp_path, capsys):
    assert convert(TINY_A, tmp_path / "m.ckpt", "--format", "ckpt") == 0
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    state["model"]["decoder.self_attns.0.O_dense.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.ckpt")
    one_line_error(capsys, [tmp_path / "bad.ckpt", tmp_path / "out", "--format", "hf"],
                   "decoder.self_attns.0.O_dense.bias [5]", "need [8]")
