"""The streaming printer prints, piece by piece, exactly the sample's text."""
import io

import torch
from hypothesis import given, settings, strategies as st

from utils.samples.interactive import StreamPrinter
from utils.processor import get_encoder

ENCODER = get_encoder()
END = 50256


def streamed(ids, done_at=None):
    out = io.StringIO()
    printer = StreamPrinter(ENCODER, END, out)
    for i, token in enumerate(ids):
        done = done_at is not None and i >= done_at
        printer(torch.tensor([token]), torch.tensor([done]))
    printer.close()
    return out.getvalue()


def test_characters_split_across_tokens_print_whole():
    text = "naïve café 😀 日本語 done"
    ids = ENCODER.encode(text)
    assert len(ids) > len(text.split())  # some characters span tokens
    assert streamed(ids) == text


def test_partial_character_is_held_back_until_complete():
    ids = ENCODER.encode("😀")
    assert len(ids) > 1
    out = io.StringIO()
    printer = StreamPrinter(ENCODER, END, out)
    printer(torch.tensor([ids[0]]), torch.tensor([False]))
    assert out.getvalue() == ""  # half an emoji is not printed
    for token in ids[1:]:
        printer(torch.tensor([token]), torch.tensor([False]))
    assert out.getvalue() == "😀"


def test_stops_at_end_token_and_after_done():
    ids = ENCODER.encode("one two") + [END] + ENCODER.encode(" three")
    assert streamed(ids) == "one two"
    ids = ENCODER.encode(" a b c")
    assert streamed(ids, done_at=1) == ENCODER.decode(ids[:2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255), st.integers(0, END - 1)), max_size=30))
def test_any_ids_print_the_whole_decoding(ids):
    # Byte-level tokens can make invalid UTF-8: whatever they decode to, the
    # pieces printed add up to decoding all ids at once.
    assert streamed(ids) == ENCODER.decode(ids)
