"""Memory mode: a GPT-2 that keeps texar's cross-attention, trained, saved and reloaded."""
import os

import pytest
import torch

import gpt2_train_main
from test_train import data_dir, train_config  # noqa: F401 (data_dir: a fixture)
from utils.errors import UserError
from utils.model import build_model, count_parameters, gpt2_hparams, has_memory
from utils.processor import EOS_ID
from utils.checkpoints.weights import (checkpoint_model_fields, load_checkpoint, load_weights,
                                       resolve_model, save_checkpoint)

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2",
                       "models", "tiny_a", "model.ckpt")
HPARAMS = gpt2_hparams(50257, 32, 16, 2, 2)


def config(tmp_path, memory, sizes="50257, 32, 16, 2, 2"):
    path = tmp_path / f"memory_{memory}.py"
    path.write_text("from utils.model import gpt2_hparams\n"
                    f"hparams = gpt2_hparams({sizes})\nmemory = {memory!r}\n")
    return str(path)


def decode(model, memory, memory_len):
    with torch.no_grad():
        logits = model(memory=memory, memory_sequence_length=memory_len,
                       inputs=torch.tensor([[EOS_ID, 5, 6], [EOS_ID, 7, 8]]),
                       decoding_strategy="train_greedy").logits
        output, _ = model(memory=memory, memory_sequence_length=memory_len,
                          start_tokens=torch.tensor([EOS_ID, EOS_ID]), end_token=EOS_ID,
                          decoding_strategy="infer_greedy", max_decoding_length=8)
    return logits, output.sample_id


def test_memory_model_trains_saves_reloads_and_decodes_identically(tmp_path):
    torch.manual_seed(0)
    model = build_model(HPARAMS, with_memory=True)
    plain = build_model(HPARAMS)
    # The cross-attention: per layer 4 projections (E*E + E) and a layer norm (2E).
    assert count_parameters(model) - count_parameters(plain) == 2 * (4 * (16 * 16 + 16) + 32)
    memory, memory_len = torch.randn(2, 5, 16), torch.tensor([5, 3])
    tgt = torch.tensor([[EOS_ID, 1, 2, 3, EOS_ID], [EOS_ID, 4, 5, EOS_ID, EOS_ID]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cross = model.decoder.enc_dec_attns[0].Q_dense.weight
    before = cross.detach().clone()
    for _ in range(3):
        logits = model(memory=memory, memory_sequence_length=memory_len,
                       inputs=tgt[:, :-1], decoding_strategy="train_greedy").logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                 tgt[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(cross, before)  # the cross-attention learns
    model.eval()
    path = str(tmp_path / "memory.ckpt")
    save_checkpoint(path, {"model": model.state_dict(),
                           **checkpoint_model_fields(HPARAMS, has_memory(model))})
    assert load_checkpoint(path)["with_memory"] is True
    reloaded = load_weights(resolve_model(checkpoint=path)).model
    assert has_memory(reloaded)
    for mine, theirs in zip(decode(model, memory, memory_len),
                            decode(reloaded, memory, memory_len)):
        assert torch.equal(mine, theirs)


def test_a_model_without_cross_attention_refuses_a_memory_in_one_line():
    model = build_model(HPARAMS)
    assert not has_memory(model)
    with pytest.raises(UserError, match="no cross-attention.*with_memory=True"):
        model(memory=torch.zeros(1, 2, 16), memory_sequence_length=torch.tensor([2]),
              inputs=torch.tensor([[EOS_ID, 3]]), decoding_strategy="train_greedy")


def test_config_memory_adds_fresh_cross_attention_to_openai_weights(tmp_path):
    sizes = "50257, 32, 8, 2, 2"  # tiny_a's
    plain = load_weights(resolve_model(pretrain_checkpoint=FIXTURE, download=False))
    mem = load_weights(resolve_model(pretrain_checkpoint=FIXTURE, download=False,
                                     config_model=config(tmp_path, True, sizes)))
    assert mem.with_memory and not plain.with_memory
    state = mem.model.state_dict()
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(state[name], tensor), name  # OpenAI's weights, untouched
    ids = torch.tensor([[EOS_ID, 40, 588]])
    with torch.no_grad():  # without a memory the cross-attention is not used
        assert torch.equal(mem.model(inputs=ids).logits, plain.model(inputs=ids).logits)


def test_memory_settings_that_cannot_work_are_one_line_errors(tmp_path, data_dir):
    with pytest.raises(UserError, match="memory = 'yes' must be True or False"):
        resolve_model(from_scratch=True, config_model=config(tmp_path, "yes"))
    path = str(tmp_path / "plain.ckpt")
    save_checkpoint(path, {"model": build_model(HPARAMS).state_dict(),
                           **checkpoint_model_fields(HPARAMS)})
    with pytest.raises(UserError, match="sets memory = True but .* has no cross-attention"):
        resolve_model(checkpoint=path, config_model=config(tmp_path, True))
    with pytest.raises(UserError, match="feeds no memory"):
        gpt2_train_main.main(["--quiet", "--do_train", "--from_scratch",
                              "--config_model", config(tmp_path, True),
                              "--config_train", train_config(tmp_path, data_dir),
                              "--output_dir", str(tmp_path / "out")])


def test_config_memory_on_a_hugging_face_directory_keeps_its_weights(tmp_path):
    from utils.checkpoints.hf_dir import write_hf_dir
    from utils.checkpoints.hf_names import texar_to_hf_tensors
    from utils.model import model_size
    torch.manual_seed(1)
    source = build_model(HPARAMS)
    write_hf_dir(str(tmp_path / "hf"), texar_to_hf_tensors(source.state_dict(), 2),
                 model_size(HPARAMS))
    mem = load_weights(resolve_model(pretrain_model_dir=str(tmp_path / "hf"),
                                     config_model=config(tmp_path, True)))
    assert mem.with_memory
    state = mem.model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_a_memory_checkpoint_cannot_be_converted_to_gpt2_formats(tmp_path):
    import convert_checkpoint
    path = str(tmp_path / "memory.ckpt")
    save_checkpoint(path, {"model": build_model(HPARAMS, with_memory=True).state_dict(),
                           **checkpoint_model_fields(HPARAMS, True)})
    with pytest.raises(UserError, match="keeps cross-attention"):
        convert_checkpoint.main([path, str(tmp_path / "out"), "--format", "hf"])
    assert not os.path.exists(tmp_path / "out")
