"""utils.decoding.generation against references we did not write.

- texar-pytorch's own decoding on the same model: teacher-forced logits,
  built-in greedy decoding with contexts, the sampling helpers' filters and
  draws, texar.torch.utils.beam_search;
- Hugging Face transformers' GPT2LMHeadModel with the same weights (skipped
  when transformers is absent) and, always, the greedy continuations that
  transformers recorded for TF-written checkpoints (tests/fixtures/tf_gpt2).
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch

from utils.checkpoints.openai_weights import load_openai_weights
from utils.errors import UserError
from utils.decoding.generation import forward_logits, generate, next_token_logits
from utils.decoding.limits import (generation_memory, out_of_memory_as_user_error,
                                   require_generation_memory)
from utils.decoding.sampling import filter_logits
from utils.decoding.sampling import sample_from_logits
from utils.model import build_model, gpt2_hparams, hparams_from_openai

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from texar.torch.modules import TopKSampleEmbeddingHelper, TopPSampleEmbeddingHelper
    from texar.torch.modules.decoders.decoder_helpers import _top_k_logits, _top_p_logits
    from texar.torch.utils.beam_search import beam_search as texar_beam_search

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tf_gpt2")
EOT = 50256
NEVER = -1  # an end token no model produces
N_CTX = 48
CONTEXTS = [[464, 2068, 7586, 21831, 18045], [15496, 995], [11, 13, 198, 262, 995, 3, 7, 9]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(20240101)
    return build_model(gpt2_hparams(n_vocab=50257, n_ctx=N_CTX, n_embd=32,
                                    n_head=4, n_layer=2)).eval()


def texar_greedy(model, contexts, max_decoding_length, end_token):
    """texar's built-in decoding, continuation cut before the first end token."""
    longest = max(len(c) for c in contexts)
    ids = torch.tensor([c + [0] * (longest - len(c)) for c in contexts])
    lengths = torch.tensor([len(c) for c in contexts])
    with torch.no_grad():
        # texar runs max_decoding_length steps after the first context token,
        # so it returns max_decoding_length + 1 tokens: ask for one fewer.
        out, _ = model(decoding_strategy="infer_greedy", context=ids,
                       context_sequence_length=lengths,
                       max_decoding_length=max_decoding_length - 1, end_token=end_token)
    result = []
    for row, ctx in zip(out.sample_id.tolist(), contexts):
        # Shorter when every row ended before the limit.
        assert row[:len(ctx)] == ctx and len(row) <= max_decoding_length
        new = row[len(ctx):]
        assert end_token in new or len(row) == max_decoding_length
        result.append(new[:new.index(end_token)] if end_token in new else new)
    return result


# ---------------------------------------------------------------- prefill


def test_prefill_logits_equal_texar_teacher_forcing(model):
    ids = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(inputs=ids, decoding_strategy="train_greedy").logits
    torch.testing.assert_close(forward_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_padded_batch_prefill_equals_each_context_alone(model):
    batched = next_token_logits(model, CONTEXTS)
    for row, ctx in enumerate(CONTEXTS):
        alone = forward_logits(model, torch.tensor([ctx]))[0, -1]
        torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- greedy


def test_greedy_equals_texar_builtin_decoding_for_mixed_lengths(model):
    max_len = 30
    ours = generate(model, CONTEXTS, max_len, strategy="greedy", end_token=NEVER)
    assert [len(o) for o in ours] == [max_len - len(c) for c in CONTEXTS]
    assert ours == texar_greedy(model, CONTEXTS, max_len, NEVER)
    # An end token that row 0 produces part-way: it stops there, the others
    # stop wherever they produce it too (or run to the limit), as in texar.
    end = ours[0][6]
    stopped = generate(model, CONTEXTS, max_len, strategy="greedy", end_token=end)
    assert stopped[0] == ours[0][:ours[0].index(end)]
    assert stopped == texar_greedy(model, CONTEXTS, max_len, end)


def test_batched_greedy_equals_each_context_alone(model):
    batched = generate(model, CONTEXTS, N_CTX, strategy="greedy")
    alone = [generate(model, [c], N_CTX, strategy="greedy")[0] for c in CONTEXTS]
    assert batched == alone
    assert any(len(row) > 20 for row in batched)  # long enough to mean something


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_widen_long_products_to_float32(model, dtype, monkeypatch):
    """On CPU, products of many rows run in float32 on widened 16-bit weights:
    the logits agree with the 16-bit products and with the float32 model."""
    from utils.decoding import linear as cpu_linear
    half = build_model(gpt2_hparams(n_vocab=50257, n_ctx=N_CTX, n_embd=32, n_head=4,
                                    n_layer=2)).eval()
    half.load_state_dict(model.state_dict())
    half.to(dtype)
    contexts = [CONTEXTS[0] * 4, CONTEXTS[2] * 2]  # 20 and 16 rows: widened
    full = next_token_logits(model, contexts)
    widened = next_token_logits(half, contexts)
    monkeypatch.setattr(cpu_linear, "UPCAST_MIN_ROWS", 10 ** 9)
    narrow = next_token_logits(half, contexts)
    assert widened.dtype == narrow.dtype == dtype
    scale = full.abs().max()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (widened.float() - full).abs().max() < tolerance * scale
    assert (widened.float() - narrow.float()).abs().max() < tolerance * scale
    monkeypatch.undo()
    rows = generate(half, contexts, N_CTX, strategy="greedy", end_token=NEVER)
    assert [len(r) for r in rows] == [N_CTX - len(c) for c in contexts]


def hf_from_texar(model):
    """transformers' GPT2LMHeadModel holding a copy of the texar weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from utils.checkpoints.hf_names import hf_gpt2_config, texar_to_hf_state_dict
    from utils.model import model_size
    sizes = model_size(model.hparams.todict())
    hf = GPT2LMHeadModel(GPT2Config(**hf_gpt2_config(sizes)))
    hf.load_state_dict(texar_to_hf_state_dict(model.state_dict(), sizes["n_layer"]))
    return hf.eval()


def test_greedy_equals_transformers_gpt2(model):
    pytest.importorskip("transformers")
    hf = hf_from_texar(model)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    max_len = 40
    ours = generate(model, CONTEXTS, max_len, strategy="greedy", end_token=NEVER)
    for ctx, row in zip(CONTEXTS, ours):
        ids = torch.tensor([ctx])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=max_len - len(ctx))
        assert row == out[0, len(ctx):].tolist()


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_greedy_equals_transformers_reference_on_tf_checkpoints(name):
    """Checkpoints written by TensorFlow, continuations recorded by transformers."""
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        meta = json.load(f)
    ref = np.load(os.path.join(FIXTURES, "reference", name + ".npz"), allow_pickle=False)
    gpt2 = build_model(hparams_from_openai(meta["hparams"])).eval()
    load_openai_weights(gpt2, os.path.join(FIXTURES, "models", name, "model.ckpt"))
    n_ctx = meta["hparams"]["n_ctx"]
    cases = meta["greedy"]
    prompts = [c["prompt_ids"] for c in cases]
    # Both prompts in one padded batch, and the full length, not stopping at 50256.
    ours = generate(gpt2, prompts, n_ctx, strategy="greedy", end_token=NEVER)
    for case, row in zip(cases, ours):
        assert case["prompt_ids"] + row == case["output_ids"]
    # With <|endoftext|> as the end token: cut before its first occurrence.
    stopped = generate(gpt2, prompts, n_ctx, strategy="greedy")
    for case, row in zip(cases, stopped):
        first = case["first_eot_index"] or len(case["output_ids"])
        assert case["prompt_ids"] + row == case["output_ids"][:first]
    # Padded prefill of the two reference sequences (one starts with 50256).
    rows = [ref["input_ids"][b, :n].tolist() for b, n in enumerate(ref["lengths"])]
    np.testing.assert_allclose(next_token_logits(gpt2, rows).numpy(), ref["logits_last"],
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------- end token


def test_rows_stop_at_end_token_and_decoding_exits_early(model):
    # Make <|endoftext|> the argmax everywhere: a final layer norm that always
    # outputs `direction`, and an end-token embedding far along it.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
            model.decoder.final_layer_norm.weight.zero_()
            model.decoder.final_layer_norm.bias.copy_(direction)
            model.word_embedder.embedding[EOT] = 50 * direction
        steps = []
        out = generate(model, CONTEXTS, 40, strategy="greedy",
                       on_tokens=lambda ids, done: steps.append((ids.clone(), done.clone())))
        assert out == [[], [], []]
        assert len(steps) == 1 and steps[0][1].all() and (steps[0][0] == EOT).all()
    finally:
        model.load_state_dict(state)


def test_on_tokens_streams_each_row_until_it_ends(model):
    full = generate(model, CONTEXTS, 30, strategy="greedy", end_token=NEVER)
    end = full[1][3]  # row 1 ends at its 4th token
    calls = []
    out = generate(model, CONTEXTS, 30, strategy="greedy", end_token=end,
                   on_tokens=lambda ids, done: calls.append((ids.tolist(), done.tolist())))
    streamed = [[ids[r] for ids, _ in calls if ids[r] != end] for r in range(3)]
    assert streamed == out
    first_done = [next(i for i, (_, done) in enumerate(calls) if done[r]) for r in range(3)]
    assert first_done[1] == 3
    assert len(calls) == max(first_done) + 1  # stops once every row is done


# ---------------------------------------------------------------- sampling


def texar_top_k(logits, k):
    return _top_k_logits(logits.clone(), k)


def texar_top_p(logits, p):
    return _top_p_logits(logits.clone(), p)


def assert_same_distribution(ours, theirs):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(theirs, -1),
                               atol=1e-6, rtol=0)


def random_logits(ties: bool):
    g = torch.Generator().manual_seed(7)
    if ties:  # few distinct values: ties at every threshold
        return torch.randint(0, 6, (6, 300), generator=g).float()
    return torch.randn(6, 300, generator=g) * 3


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 40, 299])
def test_top_k_equals_texar(ties, k):
    logits = random_logits(ties)
    assert_same_distribution(filter_logits(logits, top_k=k), texar_top_k(logits, k))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999])
def test_top_p_equals_texar(ties, p):
    logits = random_logits(ties)
    assert_same_distribution(filter_logits(logits, top_p=p), texar_top_p(logits, p))


@pytest.mark.parametrize("ties", [False, True])
def test_temperature_then_top_k_then_top_p(ties):
    logits = random_logits(ties)
    for k, p, t in [(10, 0.5, 0.7), (40, 0.9, 1.3), (1, 0.5, 2.0), (300, 0.3, 1.0)]:
        expected = texar_top_p(texar_top_k(logits / t, k), p)
        assert_same_distribution(filter_logits(logits, temperature=t, top_k=k, top_p=p),
                                 expected)


def test_filters_off_leave_logits_unchanged():
    logits = random_logits(False)
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


@pytest.mark.parametrize("helper,kwargs,temperature", [
    ("top_k", {"top_k": 40}, 0.7), ("top_k", {"top_k": 0}, 1.0),
    ("top_p", {"top_p": 0.9}, 0.7)])
def test_sampling_draws_what_texar_helpers_draw(model, helper, kwargs, temperature):
    """Same seed, same tokens as texar's sampling helpers (one-token contexts,
    where texar draws exactly once per new token, as we do)."""
    starts = torch.tensor([5, 17, 300])
    torch.manual_seed(123)
    if helper == "top_k":
        h = TopKSampleEmbeddingHelper(starts, EOT, kwargs["top_k"], temperature)
    else:
        h = TopPSampleEmbeddingHelper(starts, EOT, kwargs["top_p"], temperature)
    with torch.no_grad():
        out, lengths = model(helper=h, max_decoding_length=15)
    expected = [row[:n] for row, n in zip(out.sample_id.tolist(), lengths.tolist())]
    expected = [row[:row.index(EOT)] if EOT in row else row for row in expected]
    torch.manual_seed(123)
    ours = generate(model, [[5], [17], [300]], 16, strategy="sample",
                    temperature=temperature, **kwargs)
    assert ours == expected


def test_same_seed_same_samples_different_seed_different(model):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, CONTEXTS, 24, strategy="sample", top_k=50, generator=g,
                        end_token=NEVER)
    assert run(1) == run(1)
    assert run(1) != run(2)
    # The passed generator is used, not the global RNG.
    torch.manual_seed(0)
    a = run(3)
    torch.manual_seed(99)
    assert run(3) == a


def test_top_k_1_sampling_equals_greedy(model):
    g = torch.Generator().manual_seed(5)
    assert (generate(model, CONTEXTS, 40, strategy="sample", top_k=1, generator=g)
            == generate(model, CONTEXTS, 40, strategy="greedy"))


# ---------------------------------------------------------------- beam search


def texar_beam_on_context(model, context, max_decoding_length, width, alpha, end_token):
    """texar.torch.utils.beam_search driven by teacher-forced texar forwards."""
    prefix = torch.tensor(context[:-1], dtype=torch.long)

    def next_logits(ids):
        full = torch.cat([prefix.expand(ids.size(0), -1), ids], dim=1)
        with torch.no_grad():
            return model(inputs=full, decoding_strategy="train_greedy").logits[:, -1]

    seqs, _ = texar_beam_search(next_logits, torch.tensor([context[-1]]), width,
                                max_decoding_length - len(context), 50257, alpha,
                                eos_id=end_token)
    best = seqs[0, 0, 1:].tolist()
    return best[:best.index(end_token)] if end_token in best else best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_equals_texar_beam_search(model, alpha):
    max_len = 24
    free = generate(model, CONTEXTS, max_len, strategy="beam", beam_width=3,
                    length_penalty=alpha, end_token=NEVER)
    # An end token the best beams meet part-way, so finished beams compete
    # with alive ones and the stopping rule matters.
    end = free[0][4]
    ours = generate(model, CONTEXTS, max_len, strategy="beam", beam_width=3,
                    length_penalty=alpha, end_token=end)
    expected = [texar_beam_on_context(model, c, max_len, 3, alpha, end) for c in CONTEXTS]
    assert ours == expected
    assert len(ours[0]) < max_len - len(CONTEXTS[0])  # a finished beam won


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_texar_builtin_beam_decoding(model, alpha):
    """model(start_tokens=..., beam_width=...): texar's own beam decoding."""
    starts = [5, 17, 300]
    with torch.no_grad():
        out = model(start_tokens=torch.tensor(starts), beam_width=4, length_penalty=alpha,
                    max_decoding_length=19, end_token=EOT)
    expected = []
    for row in out["sample_id"][:, :, 0].tolist():
        expected.append(row[:row.index(EOT)] if EOT in row else row)
    ours = generate(model, [[s] for s in starts], 20, strategy="beam", beam_width=4,
                    length_penalty=alpha)
    assert ours == expected


def test_beam_width_1_equals_greedy(model):
    assert (generate(model, CONTEXTS, 30, strategy="beam", beam_width=1)
            == generate(model, CONTEXTS, 30, strategy="greedy"))


def test_beam_streaming_is_refused(model):
    with pytest.raises(ValueError, match="beam"):
        generate(model, CONTEXTS, 30, strategy="beam", on_tokens=lambda i, d: None)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("contexts,max_len,kwargs,words", [
    ([[]], 10, {}, ["context 0 is empty"]),
    ([[1, 2]], N_CTX + 1, {}, [str(N_CTX + 1), str(N_CTX), "n_ctx"]),
    ([[1, 2], list(range(10))], 10, {},
     ["context 1 has 10 tokens", "max_decoding_length 10", "--max_decoding_length",
      "shorten the prompt"]),
    ([[1, 50257]], 10, {}, ["50257", "vocabulary"]),
    ([[1]], 10, {"temperature": 0.0}, ["temperature"]),
    ([[1]], 10, {"temperature": -1.0}, ["temperature"]),
    ([[1]], 10, {"temperature": float("nan")}, ["temperature", "nan"]),
    ([[1]], 10, {"temperature": float("inf")}, ["temperature", "inf"]),
    ([[1]], 10, {"temperature": 1e-45}, ["temperature", "1.18e-38"]),
    ([[1]], 10, {"strategy": "beam", "length_penalty": float("nan")},
     ["length_penalty", "nan"]),
    ([[1]], 10, {"strategy": "beam", "length_penalty": 1e308}, ["length_penalty"]),
    ([[1]], 10, {"top_k": -1}, ["top_k"]),
    ([[1]], 10, {"top_p": 0.0}, ["top_p", "(0, 1]"]),
    ([[1]], 10, {"top_p": 1.5}, ["top_p"]),
    ([[1]], 10, {"strategy": "nucleus"}, ["nucleus", "greedy, sample, beam"]),
    ([[1]], 10, {"strategy": "beam", "beam_width": 0}, ["beam_width"]),
])
def test_bad_arguments_raise_one_line_user_errors(model, contexts, max_len, kwargs, words):
    with pytest.raises(UserError) as err:
        generate(model, contexts, max_len, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_no_contexts_gives_no_outputs(model):
    assert generate(model, [], 10) == []


def test_dropout_is_never_applied():
    """A model with dropout, left in training mode, decodes as texar does in eval mode."""
    torch.manual_seed(3)
    noisy = build_model(gpt2_hparams(n_vocab=50257, n_ctx=N_CTX, n_embd=32, n_head=4,
                                     n_layer=2, dropout=0.5))
    noisy.train()
    ours = generate(noisy, CONTEXTS, 24, strategy="greedy", end_token=NEVER)
    assert noisy.training
    noisy.eval()
    assert ours == texar_greedy(noisy, CONTEXTS, 24, NEVER)


# ------------------------------------------------- extreme values and memory


def test_tiny_temperature_puts_all_mass_on_the_top_token():
    """logits / 1e-37 overflows float32; the filter still gives a distribution
    (not NaN) and it is the greedy one."""
    logits = random_logits(False) * 100
    filtered = filter_logits(logits, temperature=1e-37)
    probs = torch.softmax(filtered, -1)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.max(-1).values, torch.ones(len(logits)))
    assert torch.equal(sample_from_logits(filtered), logits.argmax(-1))


def test_tiny_temperature_sampling_equals_greedy(model):
    g = torch.Generator().manual_seed(4)
    assert (generate(model, CONTEXTS, 30, strategy="sample", temperature=1e-37,
                     generator=g, end_token=NEVER)
            == generate(model, CONTEXTS, 30, strategy="greedy", end_token=NEVER))


def test_non_finite_scores_are_a_user_error_not_a_multinomial_crash():
    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])
    with pytest.raises(UserError, match="not finite") as err:
        sample_from_logits(logits)
    assert "\n" not in str(err.value)


TINY_SIZES = {"n_vocab": 50257, "n_ctx": 32, "n_embd": 8, "n_head": 2, "n_layer": 2}


def test_generation_memory_grows_with_rows_and_beams():
    def total(**kw):
        return sum(generation_memory(TINY_SIZES, max_decoding_length=20,
                                     prompt_length=1, **kw).values())
    one, many = total(batch_size=1), total(batch_size=100)
    weights = generation_memory(TINY_SIZES, batch_size=1, max_decoding_length=20,
                                prompt_length=1)["weights"]
    assert weights == 4 * 404072  # the tiny model's float32 parameters
    assert many - weights == pytest.approx(100 * (one - weights), rel=0.01)
    beam_1 = total(batch_size=2, strategy="beam", beam_width=1) - weights
    assert total(batch_size=2, strategy="beam", beam_width=5) - weights > 4 * beam_1
    # Without beam search --beam_width takes no memory.
    assert total(batch_size=2, strategy="sample", beam_width=5) == total(batch_size=2)
    bf16 = generation_memory(TINY_SIZES, batch_size=1, max_decoding_length=20,
                             prompt_length=1, dtype=torch.bfloat16)
    assert bf16["weights"] == weights // 2


def test_require_generation_memory_names_the_estimate_and_the_fix(monkeypatch):
    monkeypatch.setattr("utils.memory.available_bytes", lambda device=None: 2 ** 20)
    with pytest.raises(UserError) as err:
        require_generation_memory(TINY_SIZES, batch_size=8, max_decoding_length=20,
                                  prompt_length=1, fix="use fewer rows")
    message = str(err.value)
    for words in ("generating 8 row(s) of up to 20 tokens in float32",
                  "key/value cache", "next-token scores", "needs about",
                  "1.0 MiB of RAM is free: use fewer rows"):
        assert words in message
    monkeypatch.setattr("utils.memory.available_bytes", lambda device=None: 2 ** 40)
    require_generation_memory(TINY_SIZES, batch_size=8, max_decoding_length=20,
                              prompt_length=1)  # fits: no error


def test_allocation_failures_become_one_line_other_errors_pass():
    with pytest.raises(UserError) as err:
        with out_of_memory_as_user_error("doing it", "do less"):
            torch.empty(2 ** 62, dtype=torch.uint8)  # a real allocator failure
    assert str(err.value) == "ran out of memory doing it: do less"
    with pytest.raises(UserError):
        with out_of_memory_as_user_error("doing it", "do less"):
            raise MemoryError()
    with pytest.raises(RuntimeError, match="size mismatch"):
        with out_of_memory_as_user_error("doing it", "do less"):
            raise RuntimeError("size mismatch")


@pytest.mark.parametrize("kwargs,argv", [
    ({"temperature": float("nan")}, ["--temperature", "nan"]),
    ({"top_k": -2}, ["--top_k", "-2"]),
    ({"top_p": 1.5}, ["--top_p", "1.5"]),
    ({"strategy": "beam", "beam_width": 0}, ["--beam_width", "0"]),
    ({"strategy": "beam", "length_penalty": 11.0}, ["--length_penalty", "11"]),
])
def test_generate_and_the_flags_refuse_a_value_with_the_same_rule(model, kwargs, argv):
    """One rule per value (utils.flags): the library call and the flag agree."""
    import gpt2_generate_main
    from utils.decoding.settings import SamplingSettings
    with pytest.raises(UserError) as from_call:
        generate(model, [[1]], 10, **kwargs)
    with pytest.raises(UserError) as from_flag:
        SamplingSettings.from_flags(gpt2_generate_main.parse_args(argv))
    assert str(from_call.value) == str(from_flag.value)
