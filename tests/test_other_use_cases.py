"""examples/other_use_cases.py: every "Other Use Cases" snippet of examples/README.md runs, on a tiny
model, and gives what our own code gives; that page shows the file's code."""
import importlib.util
import math
import os
import re

import pytest
import torch

from conftest import REPO_ROOT
from utils.errors import UserError
from utils.decoding.generation import generate
from utils.training.lm import lm_nll
from utils.model import build_model, gpt2_hparams
from utils.processor import EOS_ID, get_encoder
from tolerances import summation_tolerance

EXAMPLE = os.path.join(REPO_ROOT, "examples", "other_use_cases.py")
SNIPPET = re.compile(r"\n *# \[(\w+)\]\n(.*?)\n *# \[end\]", re.S)


def load_example():
    spec = importlib.util.spec_from_file_location("other_use_cases", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def uc():
    return load_example()


@pytest.fixture(scope="module")
def hparams():
    return gpt2_hparams(50257, 48, 16, 2, 2)


@pytest.fixture
def model(hparams):
    torch.manual_seed(5)
    return build_model(hparams).eval()


@pytest.fixture(scope="module")
def encoder():
    return get_encoder(None)


def dedent(code):
    lines = code.split("\n")
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines)


def test_readme_shows_each_snippet_of_the_file():
    with open(EXAMPLE, encoding="utf-8") as f:
        snippets = {name: dedent(code) for name, code in SNIPPET.findall(f.read())}
    with open(os.path.join(REPO_ROOT, "examples", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert set(snippets) == {"greedy", "top_k", "gumbel", "beam", "perplexity",
                             "memory_model", "memory"}
    for name, code in snippets.items():
        assert f"```python\n{code}\n```" in readme, f"examples/README.md lacks snippet {name}"


def test_greedy_equals_our_generation_engine(uc, model, encoder):
    ctx, ctx_len = uc.context_of(encoder, "The weather today")
    with torch.no_grad():
        sample_id, length = uc.greedy(model, ctx, ctx_len)
    ours = generate(model, [ctx[0].tolist()], 30, strategy="greedy", end_token=EOS_ID)[0]
    texar = sample_id[0, ctx.size(1):int(length[0])].tolist()
    assert texar[:len(ours)] == ours and len(ours) > 0


def test_top_k_continues_the_context(uc, model, encoder):
    ctx, ctx_len = uc.context_of(encoder, "The weather today")
    torch.manual_seed(0)
    with torch.no_grad():
        sample_id, length = uc.top_k(model, ctx, ctx_len)
    assert sample_id[0, :ctx.size(1)].tolist() == ctx[0].tolist()
    assert ctx.size(1) < int(length[0]) <= 31  # texar counts the first token on top


def test_gumbel_softmax_gives_distributions_and_gradients(uc, model):
    torch.manual_seed(0)
    soft = uc.gumbel_softmax(model, 2)
    assert soft.shape[0] == 2 and soft.shape[2] == 50257
    # Each row is a softmax over 50,257 tokens: its sum may be off by the
    # rounding of that many additions, which depends on the CPU's order.
    atol = summation_tolerance(soft.dtype, soft.shape[-1])
    torch.testing.assert_close(soft.sum(-1), torch.ones(soft.shape[:2]), atol=atol, rtol=0)
    grad = model.word_embedder.embedding.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_beam_search_returns_beams(uc, model):
    with torch.no_grad():
        output = uc.beam_search(model)
    assert output["sample_id"].shape[0] == 1 and output["sample_id"].shape[2] == 4
    scores = output["log_prob"][0]
    assert torch.all(scores[:-1] >= scores[1:])  # best first


def test_perplexity_equals_our_corpus_evaluation(uc, model, encoder):
    text = "The weather today is sunny."
    with torch.no_grad():
        ppl = uc.perplexity(model, encoder, text)
        ids = torch.tensor([[EOS_ID] + encoder.encode(text) + [EOS_ID]])
        nll, count = lm_nll(model, ids, torch.tensor([ids.size(1)]), per_token=True)
    assert ppl == pytest.approx(math.exp(float(nll) / int(count)), rel=1e-5)


def test_memory_model_trains_and_decodes_with_a_source_encoder(uc, model, hparams):
    memory_model = uc.memory_model(hparams, model.state_dict())
    src = torch.tensor([[EOS_ID, 11, 12, 13], [EOS_ID, 21, 22, EOS_ID]])
    tgt = torch.tensor([[EOS_ID, 31, 32, EOS_ID], [EOS_ID, 41, EOS_ID, EOS_ID]])
    torch.manual_seed(0)
    loss, answer = uc.memory_step(memory_model.train(), src, torch.tensor([4, 3]),
                                  tgt, torch.tensor([4, 3]))
    assert math.isfinite(loss) and answer.shape[0] == 2
    # Without cross-attention the same call is one clear error, not texar's IndexError.
    with pytest.raises(UserError, match="no cross-attention"):
        model(memory=torch.zeros(2, 4, 16), memory_sequence_length=torch.tensor([4, 3]),
              inputs=tgt[:, :-1], decoding_strategy="train_greedy")
