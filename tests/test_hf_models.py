"""--pretrain_model_dir with Hugging Face GPT-2 directories, in all three scripts.

The directories are saved by transformers' own save_pretrained (model and
tokenizer); greedy continuations are compared with transformers' generate.
`hf:NAME` is tested only where it needs no network: huggingface_hub missing,
and offline with nothing cached.
"""
import builtins
import json
import os
import sys

import numpy as np
import pytest
import torch
import transformers  # a test dependency (requirements-test.txt)

from tests.test_convert_checkpoint import write_train_config
from utils.errors import UserError
from utils.processor import SHIPPED_VOCAB_DIR, get_encoder
from utils.checkpoints.weights import FROM_HF, load_weights, resolve_model
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"n_vocab": 50257, "n_ctx": 24, "n_embd": 16, "n_head": 4, "n_layer": 2}
# Nothing listens on the discard port: a model wrongly taken for OpenAI's
# would fail to download instead of reaching the network.
ENV = dict(os.environ, OMP_NUM_THREADS="1", GPT2_DOWNLOAD_BASE_URL="http://127.0.0.1:9",
           GPT2_DOWNLOAD_BACKOFF="0")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A GPT-2 saved by transformers, with its tokenizer, in a folder named like
    a released OpenAI model (which must not make it taken for one)."""
    directory = tmp_path_factory.mktemp("hub") / "gpt2"
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=SIZES["n_vocab"], n_positions=SIZES["n_ctx"],
                                     n_embd=SIZES["n_embd"], n_head=SIZES["n_head"],
                                     n_layer=SIZES["n_layer"])
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the init, so that greedy choices are clear
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(directory))
    tokenizer = transformers.GPT2TokenizerFast(
        vocab_file=os.path.join(SHIPPED_VOCAB_DIR, "encoder.json"),
        merges_file=os.path.join(SHIPPED_VOCAB_DIR, "vocab.bpe"))
    tokenizer.save_pretrained(str(directory))
    return directory, model


def run(script, *args, env=ENV):
    return script_server.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_greedy_generation_equals_transformers_generate(hf_dir):
    directory, model = hf_dir
    assert "vocab.json" in os.listdir(directory) and "config.json" in os.listdir(directory)
    with torch.no_grad():
        ids = model.generate(torch.tensor([[50256]]), max_new_tokens=12, do_sample=False,
                             attention_mask=torch.ones(1, 1, dtype=torch.long),
                             pad_token_id=50256)[0, 1:].tolist()
    assert 50256 not in ids  # the whole continuation is printed
    proc = run("gpt2_generate_main.py", "--pretrain_model_dir", directory,
               "--decoding_strategy", "greedy", "--max_decoding_length", 13)
    assert proc.returncode == 0, proc.stderr
    sample = proc.stdout.split(" SAMPLE 1 =")[1].split("\n", 1)[1].rsplit("\n=", 1)[0]
    assert sample == get_encoder().decode(ids)
    assert f"Loaded Hugging Face model {directory}" in proc.stderr


def test_sizes_come_from_config_json_before_any_weight_is_read(hf_dir, tmp_path):
    directory, _ = hf_dir
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not yet downloaded")
    resolved = resolve_model(pretrain_model_dir=str(tmp_path))
    assert (resolved.origin, resolved.sizes) == (FROM_HF, SIZES)
    assert resolved.sizes_from == str(tmp_path / "config.json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_weights(resolved)
    loaded = load_weights(resolve_model(pretrain_model_dir=str(directory)))
    assert loaded.vocab_dir == str(directory)


def test_training_starts_from_a_hugging_face_directory(hf_dir, tmp_path):
    directory, model = hf_dir
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("The bakery opens at six.\nBoats come in.\n" * 2)
    proc = run("prepare_data.py", "--quiet", "--data_dir", data, "--max_seq_length", 16,
               "--pretrain_model_dir", directory)
    assert proc.returncode == 0, proc.stderr
    proc = run("gpt2_train_main.py", "--do_train", "--quiet", "--pretrain_model_dir",
               directory, "--config_train", write_train_config(tmp_path, data),
               "--output_dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if '"train"' in line]
    assert steps and all(np.isfinite(s["loss"]) for s in steps if "loss" in s)
    trained = torch.load(tmp_path / "out" / "model.ckpt", weights_only=True)["model"]
    start = model.state_dict()["transformer.wpe.weight"]
    assert not torch.equal(trained["position_embedder._embedding"], start)


def test_a_directorys_own_vocabulary_is_used_by_every_script(hf_dir, tmp_path):
    directory, _ = hf_dir
    own = tmp_path / "own"
    own.mkdir()
    for name in os.listdir(directory):
        (own / name).write_bytes((directory / name).read_bytes())
    os.remove(own / "tokenizer.json")  # transformers would read it instead of vocab.json
    vocab = json.loads((own / "vocab.json").read_text(encoding="utf-8"))
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]
    (own / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("Once the cat\n")
    proc = run("prepare_data.py", "--quiet", "--data_dir", data, "--max_seq_length", 8,
               "--pretrain_model_dir", own)
    assert proc.returncode == 0, proc.stderr
    assert "(vocab.json/merges.txt)" in proc.stderr
    ids = np.load(data / "train.npy", allow_pickle=False)["text_ids"][0]
    expected = transformers.AutoTokenizer.from_pretrained(str(own))("Once the cat")["input_ids"]
    assert ids[1:4].tolist() == expected and vocab["Ġthe"] in expected
    loaded = load_weights(resolve_model(pretrain_model_dir=str(own)))
    assert get_encoder(loaded.vocab_dir).encode("Once the cat") == expected


def test_a_directory_with_neither_format_says_what_it_holds(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.h5").write_bytes(b"x")
    line = one_error_line(run("gpt2_generate_main.py", "--pretrain_model_dir",
                              tmp_path / "model"))
    assert "neither an OpenAI GPT-2 model" in line and "it holds weights.h5" in line
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    line = one_error_line(run("gpt2_generate_main.py", "--pretrain_model_dir",
                              tmp_path / "model"))
    assert "has config.json but no model.safetensors" in line


def test_hub_name_without_huggingface_hub_says_how_to_get_the_directory(monkeypatch):
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith("huggingface_hub"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(UserError) as err:
        resolve_model(pretrain_model_dir="hf:openai-community/gpt2")
    message = str(err.value)
    assert "huggingface_hub, which is not installed" in message
    assert "huggingface-cli download openai-community/gpt2 --local-dir DIR" in message
    assert "\n" not in message


def test_hub_name_offline_and_not_cached_is_one_line(tmp_path):
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    for script in ("gpt2_generate_main.py", "prepare_data.py", "convert_checkpoint.py"):
        args = (["hf:openai-community/gpt2", tmp_path / "out", "--format", "hf"]
                if script == "convert_checkpoint.py"
                else ["--pretrain_model_dir", "hf:openai-community/gpt2"])
        line = one_error_line(run(script, *args, env=env))
        assert "cannot fetch hf:openai-community/gpt2" in line and "offline" in line
        assert "huggingface-cli download openai-community/gpt2 --local-dir DIR" in line
    line = one_error_line(run("gpt2_generate_main.py", "--pretrain_model_dir", "hf:../x",
                              env=env))
    assert "is not a Hugging Face model name" in line
