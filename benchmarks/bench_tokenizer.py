"""How fast does utils/processor.py encode English prose, next to the alternatives?

Encodes a few MB of generated English prose (no download: sentences written
here, recombined with a fixed seed, with invented words for a long tail) in one
process, one thread, and prints MB/s for:

- ours: `get_encoder().encode(text)`, starting from an empty piece cache,
  and again with the cache warm (the regex split is then most of the time);
- ours without the piece cache: our BPE run on every piece, as a port of
  OpenAI's encoder without its cache would (timed on an eighth of the text);
- tiktoken and Hugging Face `tokenizers`, when importable (they are not project
  dependencies), built offline from the shipped vocabulary files. Both get the
  whole text in one call (their batch calls would use more threads).

All of them must produce identical ids on the text. Best of --repeats runs is
reported, since the machine's CPU may be shared.

    python benchmarks/bench_tokenizer.py [--mb 4] [--repeats 3]
"""
import argparse
import os
import random
import sys
import time
from itertools import chain

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.processor import (EOS_ID, EOS_TOKEN, GPT2_SPLIT_PATTERN,  # noqa: E402
                             SHIPPED_VOCAB_DIR, get_encoder)

ENCODER_JSON = os.path.join(SHIPPED_VOCAB_DIR, "encoder.json")
VOCAB_BPE = os.path.join(SHIPPED_VOCAB_DIR, "vocab.bpe")

NAMES = ["Margaret", "Tomasz", "Aiko", "the harbour master", "Dr. Okafor", "her brother",
         "the old schoolteacher", "Luis", "a stranger from the city", "Ingrid"]
PLACES = ["the northern coast", "Lisbon", "the valley", "a village near the border",
          "the university library", "the railway station", "Reykjavik", "the orchard"]
THINGS = ["a letter", "the map", "an umbrella", "three bicycles", "the radio",
          "a jar of honey", "the telescope", "her notebook", "a basket of apples"]
ADJECTIVES = ["quiet", "enormous", "unexpected", "careful", "ridiculous", "patient",
              "weathered", "brilliant", "stubborn", "ordinary"]
SENTENCES = [
    "{name} arrived in {place} on a {adj} Tuesday in {year}, carrying {thing}.",
    "Nobody in {place} remembered why {name} had left, but everyone had a theory.",
    "It's not that {name} didn't care; it's that {thing} mattered more that week.",
    "\"We'll need {n} more days,\" said {name}, \"and at least {m} litres of water.\"",
    "The {adj} weather had lasted since {year}, or so the fishermen claimed.",
    "By the time the {adj} bell rang, {name} had already found {thing}.",
    "They'd walked {n} kilometres before anyone mentioned {place}.",
    "{name} wrote it down: {thing}, {thing2}, and something {adj} they couldn't name.",
    "In {year} the population of {place} was {big}, roughly {pct}% of what it is now.",
    "I've never trusted {adj} maps, {name} admitted, folding {thing} into a pocket.",
    "Some people say {place} is {adj}; others, mostly tourists, say it's merely quiet.",
    "You're welcome to stay, though the roof leaks and the stove is {adj}.",
    "The guide, a certain {rare}, pointed towards {rare2} and said nothing.",
    "Later she looked up '{rare}' in the dictionary and found only {rare2}.",
    "{rare} and {rare2} were the only words {name} kept from the {adj} old song.",
    "Past {place} the road forks: {rare} to the left, {rare2} straight ahead.",
]
SYLLABLES = ["ka", "vor", "el", "mi", "stra", "den", "lu", "qui", "bor", "ath",
             "yen", "sol", "dri", "mar", "ost", "ine", "pha", "gul", "rho", "tes"]


def rare_word(rng: random.Random) -> str:
    """An invented word, so the text has a long tail of unseen pieces like real prose."""
    word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
    return word.title() if rng.random() < 0.5 else word


def make_prose(n_bytes: int, seed: int = 0) -> str:
    """About `n_bytes` of English paragraphs, varied but deterministic."""
    rng = random.Random(seed)
    paragraphs, size = [], 0
    while size < n_bytes:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            template = rng.choice(SENTENCES)
            sentence = template.format(
                name=rng.choice(NAMES), place=rng.choice(PLACES),
                thing=rng.choice(THINGS), thing2=rng.choice(THINGS),
                adj=rng.choice(ADJECTIVES), year=rng.randint(1850, 2030),
                n=rng.randint(2, 40), m=rng.randint(2, 400),
                big=f"{rng.randint(1000, 900000):,}", pct=rng.randint(5, 95),
                rare=rare_word(rng), rare2=rare_word(rng))
            sentences.append(sentence[0].upper() + sentence[1:])
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        size += len(paragraph.encode("utf-8")) + 2
    return "\n\n".join(paragraphs)


def best_rate(run, n_bytes: int, repeats: int, setup=None):
    """(best MB/s, ids of the last run)."""
    best, ids = 0.0, None
    for _ in range(repeats):
        if setup:
            setup()
        start = time.perf_counter()
        ids = run()
        best = max(best, n_bytes / (time.perf_counter() - start) / 1e6)
    return best, ids


def load_tiktoken():
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        return None
    ranks = data_gym_to_mergeable_bpe_ranks(VOCAB_BPE, ENCODER_JSON)
    return tiktoken.Encoding(name="gpt2_shipped", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens={EOS_TOKEN: EOS_ID})


def load_hf_tokenizers():
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError:
        return None
    tok = Tokenizer(models.BPE.from_file(ENCODER_JSON, VOCAB_BPE))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of prose to encode")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tokenizer; best is shown")
    args = parser.parse_args()

    text = make_prose(int(args.mb * 1e6))
    n_bytes = len(text.encode("utf-8"))
    enc = get_encoder()
    rows = []

    ours, ids = best_rate(lambda: enc.encode(text), n_bytes, args.repeats,
                          setup=enc._cache.clear)
    rows.append(("ours (utils/processor.py)", ours))
    rate, _ = best_rate(lambda: enc.encode(text), n_bytes, args.repeats)
    rows.append(("ours, cache already warm", rate))

    # Same BPE on every piece, no cache; a slice is enough to time it.
    part = text[:len(text) // 8]
    part_bytes = len(part.encode("utf-8"))
    split = enc._split
    rate, part_ids = best_rate(
        lambda: list(chain.from_iterable(map(enc._encode_piece, split(part)))),
        part_bytes, args.repeats)
    assert part_ids == enc.encode(part)
    rows.append(("ours without piece cache", rate))

    tt = load_tiktoken()
    if tt is not None:
        import tiktoken
        rate, tt_ids = best_rate(lambda: tt.encode_ordinary(text), n_bytes, args.repeats)
        assert tt_ids == ids, "tiktoken disagrees with ours"
        rows.append((f"tiktoken {tiktoken.__version__} (Rust)", rate))
    hf = load_hf_tokenizers()
    if hf is not None:
        import tokenizers
        rate, hf_ids = best_rate(lambda: hf.encode(text).ids, n_bytes, args.repeats)
        assert hf_ids == ids, "tokenizers disagrees with ours"
        rows.append((f"HF tokenizers {tokenizers.__version__} (Rust)", rate))

    print(f"encoding {n_bytes / 1e6:.2f} MB of English prose ({len(ids):,} tokens), "
          f"best of {args.repeats}, one thread")
    print(f"{'tokenizer':<34} {'MB/s':>8} {'vs ours':>8}")
    for name, rate in rows:
        print(f"{name:<34} {rate:>8.2f} {rate / ours:>7.2f}x")
    if tt is None or hf is None:
        print("(tiktoken / tokenizers not installed: pip install them in a "
              "throwaway venv to compare)")


if __name__ == "__main__":
    main()
