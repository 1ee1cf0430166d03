"""The GPT-2 tokenizer gives OpenAI's token ids, round-trips text and rejects bad input clearly.

Exactness is checked against ids we did not compute ourselves: ids published for
GPT-2, and tests/fixtures/bpe/gpt2_reference_ids.json, made by
tests/fixtures/bpe/make_bpe_fixtures.py with tiktoken and Hugging Face
`tokenizers` (see that script for how to regenerate it).
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from utils.errors import UserError
from utils.processor import (EOS_ID, EOS_TOKEN, GPT2_SPLIT_PATTERN, SHIPPED_VOCAB_DIR,
                             Encoder, get_encoder)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bpe",
                       "gpt2_reference_ids.json")
SHIPPED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.fixture(scope="module")
def enc():
    return get_encoder()


@pytest.fixture(scope="module")
def reference():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------ published facts

def test_shipped_vocabulary_is_the_official_one():
    for name, digest in SHIPPED_SHA256.items():
        assert sha256(os.path.join(SHIPPED_VOCAB_DIR, name)) == digest


def test_published_gpt2_ids(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" Hello world!") == [18435, 995, 0]
    assert enc.decode([15496, 995]) == "Hello world"


def test_end_of_text_id(enc):
    with open(os.path.join(SHIPPED_VOCAB_DIR, "encoder.json"), encoding="utf-8") as f:
        assert json.load(f)["<|endoftext|>"] == 50256
    assert EOS_ID == enc.eos_id == enc.encoder[EOS_TOKEN] == 50256
    assert enc.decoder[50256] == EOS_TOKEN
    assert len(enc) == enc.vocab_size == 50257


# ------------------------------------------------- independent reference ids

def test_fixture_was_made_from_the_shipped_vocabulary(reference):
    assert reference["vocab_sha256"] == SHIPPED_SHA256
    assert set(reference["references"]) >= {"tiktoken", "tokenizers"}
    groups = {case["group"] for case in reference["cases"]}
    assert groups >= {"published", "prose", "contractions", "whitespace", "digits",
                      "controls", "emoji", "cjk", "combining", "long_words", "random"}


def test_references_agree_with_each_other(reference):
    for case in reference["cases"] + reference["special_cases"]:
        assert case["tiktoken"] == case["tokenizers"], case["text"]


def test_encode_matches_references_on_every_case(enc, reference):
    mismatches = [case["text"] for case in reference["cases"]
                  if enc.encode(case["text"]) != case["tiktoken"]]
    assert mismatches == []
    assert len(reference["cases"]) > 1000


def test_decode_inverts_reference_ids(enc, reference):
    for case in reference["cases"]:
        assert enc.decode(case["tiktoken"]) == case["text"]


def test_end_of_text_written_in_text_is_ordinary_text(enc, reference):
    case = next(c for c in reference["cases"] if c["text"] == EOS_TOKEN)
    assert EOS_ID not in case["tiktoken"]
    assert enc.encode(EOS_TOKEN) == case["tiktoken"]


def test_allow_special_matches_references(enc, reference):
    for case in reference["special_cases"]:
        assert enc.encode(case["text"], allow_special=True) == case["tiktoken"], case["text"]
        assert enc.decode(case["tiktoken"]) == case["text"]
    assert enc.encode("a" + EOS_TOKEN + "b", allow_special=True) == [64, EOS_ID, 65]


def test_lone_surrogates_are_refused_with_a_clear_error(enc, reference):
    # OpenAI's encoder fails on them (no UTF-8 form) and `tokenizers` refuses
    # them; tiktoken replaces each with U+FFFD. We refuse, telling the user to
    # do that replacement, and the replaced text then gives tiktoken's ids.
    for case in reference["surrogate_cases"]:
        text = case["text"]
        assert regex.search(r"[\ud800-\udfff]", text)
        assert case["tokenizers"] != "accepted"
        with pytest.raises(UserError, match=r"lone surrogate U\+D[89A-F][0-9A-F]{2}"):
            enc.encode(text)
        repaired = regex.sub(r"[\ud800-\udfff]", "\ufffd", text)
        assert enc.encode(repaired) == case["tiktoken"]


def merge_every_occurrence(enc, ids):
    """BPE as OpenAI's encoder.py does it: find the lowest-ranked pair, merge
    all its occurrences in one left-to-right pass, repeat. Slow, obviously right."""
    while len(ids) > 1:
        pairs = [p for p in zip(ids, ids[1:]) if p in enc._pair_rank]
        if not pairs:
            return ids
        rank = min(enc._pair_rank[p] for p in pairs)
        left, right = enc._merge_pair[rank]
        merged, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and ids[i] == left and ids[i + 1] == right:
                merged.append(enc._merge_result[rank])
                i += 2
            else:
                merged.append(ids[i])
                i += 1
        ids = merged
    return ids


def byte_ids(enc, text):
    return [enc._byte_ids[b] for b in text.encode("utf-8")]


def test_both_merge_paths_equal_openai_style_merging_on_reference_pieces(enc, reference):
    # Pieces up to 48 bytes use a list-based loop, longer ones a heap; both
    # must equal the merge-every-occurrence loop on every fixture piece.
    for case in reference["cases"]:
        for piece in regex.findall(GPT2_SPLIT_PATTERN, case["text"]):
            expected = merge_every_occurrence(enc, byte_ids(enc, piece))
            assert enc._merge_short(byte_ids(enc, piece)) == expected, piece
            assert enc._merge_long(byte_ids(enc, piece)) == expected, piece


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="aeinrst Ġ'é", max_size=300))
def test_both_merge_paths_equal_openai_style_merging_on_random_text(text):
    enc = get_encoder()
    expected = merge_every_occurrence(enc, byte_ids(enc, text))
    assert enc._merge_short(byte_ids(enc, text)) == expected
    assert enc._merge_long(byte_ids(enc, text)) == expected


# ------------------------------------------------------------------ properties

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))  # any code point except surrogates, all planes
def test_round_trip_any_text(text):
    enc = get_encoder()
    ids = enc.encode(text)
    assert all(0 <= i < len(enc) for i in ids)
    assert enc.decode(ids) == text
    assert enc.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5))
def test_allow_special_round_trip(parts):
    enc = get_encoder()
    text = EOS_TOKEN.join(parts)
    ids = enc.encode(text, allow_special=True)
    assert ids.count(EOS_ID) == text.count(EOS_TOKEN)
    assert enc.decode(ids) == text
    assert EOS_ID not in enc.encode(text)


@pytest.fixture(scope="module")
def fresh_encoder():
    return Encoder.from_files(os.path.join(SHIPPED_VOCAB_DIR, "encoder.json"),
                              os.path.join(SHIPPED_VOCAB_DIR, "vocab.bpe"))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100))
def test_piece_cache_does_not_change_results(fresh_encoder, text):
    cold = fresh_encoder
    cold._cache.clear()
    first = cold.encode(text)
    assert cold.encode(text) == first  # now from the cache
    assert get_encoder().encode(text) == first


def test_encode_batch(enc):
    texts = ["Hello world", "", " Hello world!", "a" + EOS_TOKEN]
    assert enc.encode_batch(texts) == [enc.encode(t) for t in texts]
    assert enc.encode_batch(texts, allow_special=True)[3] == [64, EOS_ID]


# -------------------------------------------------------------------- decoding

@pytest.mark.parametrize("make", [
    list, tuple, iter, lambda ids: (i for i in ids),
    lambda ids: np.array(ids, dtype=np.int64), lambda ids: np.array(ids, dtype=np.int32),
    lambda ids: torch.tensor(ids), lambda ids: torch.tensor(ids, dtype=torch.int32),
])
def test_decode_accepts_int_sequences_and_arrays(enc, make):
    ids = enc.encode(" Hello world! 😀")
    assert enc.decode(make(ids)) == " Hello world! 😀"


def test_decode_replaces_a_cut_character_like_openai(enc):
    ids = enc.encode("😀")
    assert len(ids) > 1
    assert enc.decode(ids[:1]) == "\ufffd"
    assert enc.decode_bytes(ids[:1]) == "😀".encode("utf-8")[:len(enc.decode_bytes(ids[:1]))]
    assert enc.decode([]) == ""


@pytest.mark.parametrize("bad_id", [-1, 50257, 10**9])
def test_decode_out_of_range_id_is_a_user_error(enc, bad_id):
    with pytest.raises(UserError) as err:
        enc.decode([15496, bad_id, 995])
    assert str(bad_id) in str(err.value) and "50257" in str(err.value)
    with pytest.raises(UserError, match=str(bad_id)):
        enc.decode(np.array([995, bad_id], dtype=np.int64))


def test_decode_rejects_a_batch(enc):
    with pytest.raises(ValueError, match="1-D"):
        enc.decode(torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------- loading vocabularies

def copy_vocab(directory, names=("encoder.json", "vocab.bpe")):
    os.makedirs(directory, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(SHIPPED_VOCAB_DIR, name), os.path.join(directory, name))
    return directory


def one_line_error(call, *needles):
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_default_and_empty_model_dir_use_shipped_copy(tmp_path):
    shipped = get_encoder()
    assert get_encoder(None) is shipped  # cached, not reloaded
    assert get_encoder(str(tmp_path)) is shipped  # a model dir without vocab files


def test_model_dir_with_both_files_is_used(tmp_path):
    model_dir = copy_vocab(str(tmp_path / "117M"))
    enc = get_encoder(model_dir)
    assert enc is not get_encoder()
    assert get_encoder(model_dir) is enc
    assert enc.encode(" Hello world!") == [18435, 995, 0]


def test_changed_file_is_reloaded(tmp_path):
    model_dir = copy_vocab(str(tmp_path))
    first = get_encoder(model_dir)
    path = os.path.join(model_dir, "encoder.json")
    os.utime(path, ns=(1, 1))
    assert get_encoder(model_dir) is not first


@pytest.mark.parametrize("present,missing", [("encoder.json", "vocab.bpe"),
                                             ("vocab.bpe", "encoder.json")])
def test_only_one_vocab_file_names_the_missing_one(tmp_path, present, missing):
    model_dir = copy_vocab(str(tmp_path), names=(present,))
    one_line_error(lambda: get_encoder(model_dir), model_dir, f"not {missing}")


def test_missing_model_dir(tmp_path):
    one_line_error(lambda: get_encoder(str(tmp_path / "nope")), "nope", "does not exist")


def write_broken(tmp_path, name, content):
    model_dir = copy_vocab(str(tmp_path))
    path = os.path.join(model_dir, name)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
        f.write(content)
    return model_dir, path


def shipped_text(name):
    with open(os.path.join(SHIPPED_VOCAB_DIR, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("content,needle", [
    (lambda: shipped_text("encoder.json")[:5000], "not valid JSON"),
    (lambda: "[1, 2, 3]", "JSON object"),
    (lambda: b"\xff\xfe\x00garbage", "not UTF-8"),
    (lambda: json.dumps({k: str(v) for k, v in json.loads(shipped_text("encoder.json")).items()}),
     "integer ids"),
    (lambda: json.dumps({k: v for k, v in json.loads(shipped_text("encoder.json")).items()
                         if v != 10}), "0, 1, ..., N-1"),
    (lambda: json.dumps({"!": 0, "<|endoftext|>": 1}), "byte tokens"),
    # characters outside GPT-2's byte alphabet: a latin-1 control one, and one above 255
    (lambda: json.dumps(dict(json.loads(shipped_text("encoder.json")), **{"a\x07": 50257})),
     "outside GPT-2's byte alphabet"),
    (lambda: json.dumps(dict(json.loads(shipped_text("encoder.json")), **{"a\u4e00": 50257})),
     "outside GPT-2's byte alphabet"),
])
def test_corrupt_encoder_json(tmp_path, content, needle):
    model_dir, path = write_broken(tmp_path, "encoder.json", content())
    one_line_error(lambda: get_encoder(model_dir), path, needle, "re-download")


def move_rule_first(vocab_bpe, number):
    lines = vocab_bpe.split("\n")
    rule = lines.pop(number)
    return "\n".join([lines[0], rule] + lines[1:])


@pytest.mark.parametrize("content,needle", [
    (lambda: shipped_text("vocab.bpe").split("\n", 1)[1], "'#version' header"),
    (lambda: shipped_text("vocab.bpe") + "a b c\n", "two tokens"),
    (lambda: shipped_text("vocab.bpe") + "Ġt\n", "two tokens"),
    (lambda: shipped_text("vocab.bpe") + "qqqzz Ġxyzzy\n", "does not have"),
    (lambda: shipped_text("vocab.bpe") + "Ġ t\n", "already makes"),  # rule 1 again
    (lambda: move_rule_first(shipped_text("vocab.bpe"), 40000), "before any earlier rule"),
])
def test_corrupt_vocab_bpe(tmp_path, content, needle):
    model_dir, path = write_broken(tmp_path, "vocab.bpe", content())
    one_line_error(lambda: get_encoder(model_dir), model_dir, needle, "re-download")


def test_unreadable_vocab_file(tmp_path):
    model_dir = copy_vocab(str(tmp_path), names=("vocab.bpe",))
    os.mkdir(os.path.join(model_dir, "encoder.json"))  # unreadable as a file
    one_line_error(lambda: get_encoder(model_dir), "is a directory", "encoder.json")
