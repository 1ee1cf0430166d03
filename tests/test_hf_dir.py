"""utils.checkpoints.hf_dir against Hugging Face transformers, the independent reference.

Directories saved by transformers' own save_pretrained (safetensors, sharded,
pytorch_model.bin, GPT2Model without the `transformer.` prefix) load into
texar's GPT2Decoder with transformers' logits; the directory write_hf_dir
writes loads in transformers (model and tokenizer) with our logits and token
ids. Bad directories fail with one line.
"""
import json
import os

import pytest
import torch
import transformers  # a test dependency (requirements-test.txt)

from utils.errors import UserError
from utils.checkpoints.hf_dir import (detect_format, hf_vocab_encoder, read_hf_config, read_hf_weights,
                          write_hf_dir)
from utils.checkpoints.hf_names import texar_to_hf_tensors
from utils.model import build_model, hparams_from_sizes
from utils.processor import SHIPPED_VOCAB_DIR, get_encoder

SIZES = {"n_vocab": 50257, "n_ctx": 24, "n_embd": 16, "n_head": 4, "n_layer": 2}
IDS = torch.tensor([[15496, 995, 11, 50256, 7, 318, 262, 3, 0, 50000]])
TEXT = "Hello world, the quick brown fox  jumps\nover 12 lazy dogs: héllo 🙂"


def hf_config(**overrides):
    kwargs = dict(vocab_size=SIZES["n_vocab"], n_positions=SIZES["n_ctx"],
                  n_embd=SIZES["n_embd"], n_head=SIZES["n_head"], n_layer=SIZES["n_layer"],
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Config(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(hf_config()).eval()
    with torch.no_grad():  # larger than the init, so that the logits differ visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def our_logits(directory):
    sizes = read_hf_config(directory)
    model = build_model(hparams_from_sizes(sizes)).eval()
    model.load_state_dict(read_hf_weights(directory, sizes))
    with torch.no_grad():
        return model, model(inputs=IDS).logits


def hf_logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("how", ["safetensors", "sharded", "bin", "gpt2model"])
def test_transformers_saved_directory_gives_transformers_logits(hf_model, tmp_path, how):
    if how == "gpt2model":  # GPT2Model saves names without `transformer.`
        hf_model.transformer.save_pretrained(tmp_path)
    else:
        hf_model.save_pretrained(tmp_path, safe_serialization=how != "bin",
                                 max_shard_size="300KB" if how == "sharded" else "5GB")
    names = os.listdir(tmp_path)
    assert {"safetensors": "model.safetensors", "sharded": "model.safetensors.index.json",
            "bin": "pytorch_model.bin", "gpt2model": "model.safetensors"}[how] in names
    assert detect_format(str(tmp_path)) == "hf"
    assert read_hf_config(str(tmp_path)) == SIZES
    _, ours = our_logits(str(tmp_path))
    torch.testing.assert_close(ours, hf_logits(hf_model), atol=1e-5, rtol=0)


def test_greedy_continuation_equals_transformers_generate(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model, _ = our_logits(str(tmp_path))
    prompt = IDS[:, :3]
    theirs = hf_model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(inputs=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert ids.tolist() == theirs.tolist()


def test_written_directory_loads_in_transformers(tmp_path):
    torch.manual_seed(5)
    ours = build_model(hparams_from_sizes(SIZES)).eval()
    dst = tmp_path / "export"
    files = write_hf_dir(str(dst), texar_to_hf_tensors(ours.state_dict(), SIZES["n_layer"]),
                         SIZES)
    assert sorted(files) == sorted(os.listdir(dst)) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "vocab.json",
        "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
    assert files[-1] == "config.json"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(model), ours(inputs=IDS).logits,
                                   atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(dst))
    assert tokenizer(TEXT)["input_ids"] == get_encoder().encode(TEXT)
    assert tokenizer.eos_token_id == 50256 == model.generation_config.eos_token_id
    # ... and reads back here, its vocabulary recognised as GPT-2's.
    assert read_hf_config(str(dst)) == SIZES
    again, _ = our_logits(str(dst))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    encoder, source = hf_vocab_encoder(str(dst), SIZES["n_vocab"])
    assert encoder is get_encoder() and source.startswith("GPT-2's vocabulary (as vocab.json")


def test_a_directorys_own_vocabulary_is_used_as_is(tmp_path):
    with open(os.path.join(SHIPPED_VOCAB_DIR, "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    vocab["Ġthe"], vocab["Ġa"] = vocab["Ġa"], vocab["Ġthe"]  # another tokenizer, same size
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = open(os.path.join(SHIPPED_VOCAB_DIR, "vocab.bpe"), encoding="utf-8").read()
    (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
    encoder, source = hf_vocab_encoder(str(tmp_path), 50257)
    assert source == "the directory's own vocab.json/merges.txt"
    assert encoder.encode(" the a") == get_encoder().encode(" a the")
    with pytest.raises(UserError, match=r"has 50257 tokens but the model only 1000 "
                                         r"\(vocab_size in config.json\)$"):
        hf_vocab_encoder(str(tmp_path), 1000)
    os.remove(tmp_path / "merges.txt")
    with pytest.raises(UserError, match=r"vocab.json has no merges.txt beside it"):
        hf_vocab_encoder(str(tmp_path), 50257)
    os.remove(tmp_path / "vocab.json")
    assert hf_vocab_encoder(str(tmp_path), 50257)[0] is get_encoder()


# ------------------------------------------------------------------ bad input

def write_config(directory, **fields):
    config = hf_config().to_dict()
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory / "config.json")


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "llama", r"model_type='llama': only GPT-2 models"),
    ("activation_function", "relu", r"activation_function='relu' cannot be loaded into our "
                                    r"GPT2Decoder, which uses GPT-2's tanh GELU"),
    ("layer_norm_epsilon", 1e-6, r"layer_norm_epsilon=1e-06 .* which uses 1e-5$"),
    ("tie_word_embeddings", False, r"tie_word_embeddings=False .* ties its output layer"),
    ("n_inner", 100, r"n_inner=100 .* feed-forward layer of 4\*n_embd=64$"),
    ("scale_attn_by_inverse_layer_idx", True, r"scale_attn_by_inverse_layer_idx=True"),
    ("reorder_and_upcast_attn", True, r"reorder_and_upcast_attn=True"),
    ("add_cross_attention", True, r"add_cross_attention=True .* has no cross-attention$"),
    ("scale_attn_weights", False, r"scale_attn_weights=False"),
    ("architectures", ["GPT2ForSequenceClassification"], r"architectures=\['GPT2ForSeq"),
    ("n_ctx", 48, r"n_ctx=48 .* one context size \(n_positions=24\)$"),
    ("n_embd", 18, r"n_embd \(18\) must be divisible by n_head \(4\)$"),
])
def test_config_gpt2decoder_cannot_represent_is_one_line(tmp_path, field, value, message):
    path = write_config(tmp_path, **{field: value})
    with pytest.raises(UserError, match=message) as err:
        read_hf_config(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(path)


def test_config_not_json_or_missing(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(UserError, match=r"^model config .*config.json is not valid JSON"):
        read_hf_config(str(tmp_path))
    with pytest.raises(UserError, match=r"^model config .*missing/config.json is missing$"):
        read_hf_config(str(tmp_path / "missing" / "config.json"))


def test_missing_truncated_and_mismatched_weights(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 100])
    with pytest.raises(UserError, match=r"model.safetensors is not a readable safetensors "
                                         r"file \(.*\); it may be truncated: download it again$"):
        read_hf_weights(str(tmp_path), SIZES)
    weights.write_bytes(data)
    write_config(tmp_path, n_embd=32, n_head=4)
    with pytest.raises(UserError, match=r"model.safetensors: transformer.h.0.attn.c_attn.bias "
                                        r"has shape \[48\] but config.json's sizes need "
                                        r"\[96\]: the weights and config.json do not match$"):
        read_hf_weights(str(tmp_path), read_hf_config(str(tmp_path)))
    os.remove(weights)
    with pytest.raises(UserError, match=r"has config.json but no model.safetensors or "
                                        r"pytorch_model.bin: download"):
        detect_format(str(tmp_path))
    with pytest.raises(UserError, match=r"has no model.safetensors, .* or pytorch_model.bin"):
        read_hf_weights(str(tmp_path), SIZES)


def test_sharded_index_naming_a_missing_or_outside_file(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="300KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.remove(tmp_path / first)
    with pytest.raises(UserError, match=rf"weight file .*{first} is missing; download"):
        read_hf_weights(str(tmp_path), SIZES)
    index["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"names shard file '../elsewhere.safetensors', "
                                        r"which is not a .safetensors file beside it"):
        read_hf_weights(str(tmp_path), SIZES)


def test_pickled_bin_is_refused_not_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin cannot be read as PyTorch weights "
                                        r"with weights_only=True \(UnpicklingError: "):
        read_hf_weights(str(tmp_path), SIZES)
    assert not (tmp_path / "ran").exists()


def test_detect_format(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    assert detect_format(str(tmp_path)) == "openai"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="holds both a Hugging Face config.json and an OpenAI"):
        detect_format(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("")
    with pytest.raises(UserError, match=r"is neither an OpenAI GPT-2 model .* nor a Hugging "
                                        r"Face one .*: it holds notes.txt$"):
        detect_format(str(other))
    with pytest.raises(UserError, match=r"does not exist or is not a directory"):
        detect_format(str(tmp_path / "nowhere"))


def test_write_failure_leaves_nothing(tmp_path):
    ours = build_model(hparams_from_sizes(SIZES))
    pairs = list(texar_to_hf_tensors(ours.state_dict(), SIZES["n_layer"]))
    with pytest.raises(ValueError, match=r"^tensors missing from the safetensors file: "
                                         r"\['transformer.wte.weight'\]$"):
        write_hf_dir(str(tmp_path), [p for p in pairs if p[0] != "transformer.wte.weight"],
                     SIZES)
    bad = [(n, t[:1] if n == "transformer.wpe.weight" else t) for n, t in pairs]
    with pytest.raises(ValueError, match=r"^tensor transformer.wpe.weight has shape \[1, 16\]"
                                         r", not \[24, 16\]$"):
        write_hf_dir(str(tmp_path), bad, SIZES)
    assert os.listdir(tmp_path) == []
