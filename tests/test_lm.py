"""utils/training/lm.py: the loss, corpus-level evaluation and the learning-rate schedule."""
import math

import pytest
import torch

from test_train import _write_split  # noqa: F401

from utils.data.records import PreparedSplit
from utils.training.lm import evaluate, lm_nll, lr_multiplier, target_mask
from utils.model import build_model, gpt2_hparams
from utils.processor import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_dev_perplexity_is_corpus_level_as_computed_by_hand(tmp_path):
    torch.manual_seed(0)
    model = build_model(gpt2_hparams(50257, 32, 16, 2, 2)).eval()
    gen = torch.Generator().manual_seed(1)
    lengths = [2, 9, 3, 17, 5]
    sequences = [[EOS_ID] + torch.randint(0, 50257, (n - 1,), generator=gen).tolist()
                 for n in lengths]
    _write_split(tmp_path / "dev.npy", sequences, 20)

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for seq in sequences:  # one at a time: no padding anywhere
            ids = torch.tensor([seq])
            logits = model(inputs=ids[:, :-1], decoding_strategy="train_greedy").logits
            logp = torch.log_softmax(logits.double(), dim=-1)[0]
            nll = -sum(float(logp[t, seq[t + 1]]) for t in range(len(seq) - 1))
            total_nll += nll
            total_tokens += len(seq) - 1
    expected = total_nll / total_tokens

    result = evaluate(model, PreparedSplit(str(tmp_path / "dev.npy")), 2,
                      torch.device("cpu"), progress=False)
    assert result.tokens == total_tokens == sum(lengths) - len(lengths)
    assert result.examples == 5
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


def test_padding_is_never_a_target():
    """A padded batch's loss is the sum of its examples' losses taken alone."""
    assert target_mask(torch.tensor([1, 3, 5]), 4).tolist() == [
        [False, False, False, False], [True, True, False, False], [True, True, True, True]]
    torch.manual_seed(0)
    model = build_model(gpt2_hparams(50257, 32, 16, 2, 2)).eval()
    long, short = [EOS_ID, 5, 6, 7, EOS_ID], [EOS_ID, 9]
    with torch.no_grad():
        nll_long, count_long = lm_nll(model, torch.tensor([long]), torch.tensor([5]),
                                      per_token=True)
        nll_short, _ = lm_nll(model, torch.tensor([short]), torch.tensor([2]),
                              per_token=True)
        for padding in (EOS_ID, 123):
            batch = torch.tensor([long, short + [padding] * 3])
            nll, count = lm_nll(model, batch, torch.tensor([5, 2]), per_token=True)
            assert int(count_long) == 4 and int(count) == 5
            assert float(nll) == pytest.approx(float(nll_long + nll_short), rel=1e-6)
    # The training form: the same sum in float32, and differentiable.
    nll, count = lm_nll(model, batch, torch.tensor([5, 2]))
    assert nll.dtype == torch.float32 and int(count) == 5
    assert float(nll.detach()) == pytest.approx(float(nll_long + nll_short), rel=1e-5)
    nll.backward()
    assert model.word_embedder._embedding.grad is not None


def test_the_learning_rate_warms_up_then_decays_to_min_ratio():
    schedule = dict(warmup_steps=4, total_steps=14, min_ratio=0.1)
    for decay in ("constant", "linear", "cosine"):
        warm_up = [lr_multiplier(step, decay=decay, **schedule) for step in range(5)]
        assert warm_up == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(14, decay="constant", **schedule) == 1.0
    # Two steps of ten after warm-up: 20% of the way down.
    assert lr_multiplier(6, decay="linear", **schedule) == pytest.approx(0.1 + 0.9 * 0.8)
    assert lr_multiplier(6, decay="cosine", **schedule) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)))
    for decay in ("linear", "cosine"):
        assert lr_multiplier(9, decay=decay, **schedule) == pytest.approx(0.55)
        for step in (14, 20):  # the end, and beyond it (a raised stop): min_ratio
            assert lr_multiplier(step, decay=decay, **schedule) == pytest.approx(0.1)
    assert lr_multiplier(0, warmup_steps=0, total_steps=1, decay="linear",
                         min_ratio=0.0) == 1.0
