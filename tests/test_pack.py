"""prepare_data.py --pack and --dev_fraction: whole files as one stream of full windows."""
import numpy as np
import pytest

import prepare_data
from utils.data import pack as pack_utils
from utils.data import prepare as prepare_utils
from utils.data.records import PreparedSplit
from utils.errors import UserError
from utils.processor import EOS_ID, SHIPPED_VOCAB_DIR, get_encoder

# Blank lines, runs of spaces and tabs, CRLF and lone CR, non-ASCII text,
# contractions, digits, other line breaks and literal <|endoftext|> markers.
MIXED = ("Hello  world,\r\n\r\n  indented   line\n\n\n<|endoftext|>Ünïcödé 日本語 "
         "text\r  x\t\ty\nit's   they'll<|endoftext|>\n\n   \n123 456!!  ?? "
         "\u2028 end   \n<|endoftext|><|endoftext|>  \n")


def prepare(*args):
    return prepare_data.main(["--quiet", *map(str, args)])


def write_bytes(path, text):
    path.write_bytes(text.encode("utf-8"))  # newlines exactly as given


def stream_of(path):
    """The windows of a packed file joined back: each later window's first
    token is the previous one's last."""
    split = PreparedSplit(str(path))
    stream = []
    for i in range(len(split)):
        ids = split.example(i)
        stream += ids if i == 0 else ids[1:]
    return split, stream


def hf_reference(text):
    """Hugging Face's tokenizer on the same vocabulary: it reads <|endoftext|>
    in text as the special token."""
    from transformers import GPT2TokenizerFast
    tokenizer = GPT2TokenizerFast(f"{SHIPPED_VOCAB_DIR}/encoder.json",
                                  f"{SHIPPED_VOCAB_DIR}/vocab.bpe")
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("chunk_chars", [5, 11, 64, 1 << 20])
@pytest.mark.parametrize("max_seq_length", [3, 16])
def test_packed_windows_equal_the_one_string_encoding(tmp_path, monkeypatch,
                                                      chunk_chars, max_seq_length):
    text = MIXED * 25
    write_bytes(tmp_path / "train.txt", "\ufeff" + text)  # a byte-order mark too
    monkeypatch.setattr(pack_utils, "PACK_CHUNK_CHARS", chunk_chars)
    monkeypatch.setattr(pack_utils, "MIN_CHARS_FOR_POOL", 0)  # the process pool
    prepare("--data_dir", tmp_path, "--pack", "--max_seq_length", max_seq_length,
            "--num_workers", 2)
    split, stream = stream_of(tmp_path / "train.npy")
    as_read = text.replace("\r\n", "\n").replace("\r", "\n")  # Python's text mode
    expected = [EOS_ID] + get_encoder().encode(as_read, allow_special=True)
    assert expected[1:] == hf_reference(as_read)
    assert stream == expected
    assert split.lengths.max() <= max_seq_length
    assert (split.lengths[:-1] == max_seq_length).all()  # only the last is shorter
    assert split.num_targets == len(expected) - 1  # every token after the first


def test_chunks_fall_only_between_a_word_and_a_space(tmp_path):
    write_bytes(tmp_path / "t.txt", MIXED * 5)
    chunks = list(pack_utils.text_chunks(str(tmp_path / "t.txt"), chunk_chars=9))
    assert len(chunks) > 20
    assert "".join(chunks) == (MIXED * 5).replace("\r\n", "\n").replace("\r", "\n")
    for before, after in zip(chunks, chunks[1:]):
        assert not before[-1].isspace() and after[0].isspace()


def test_a_word_longer_than_a_chunk_stays_whole(tmp_path):
    write_bytes(tmp_path / "t.txt", "a" * 50 + " b" + " c" * 30)
    chunks = list(pack_utils.text_chunks(str(tmp_path / "t.txt"), chunk_chars=10))
    assert chunks[0] == "a" * 50 and "".join(chunks) == "a" * 50 + " b" + " c" * 30


def test_training_predicts_every_token_of_a_packed_window():
    """The loss's targets of a window are all its tokens but the first, which
    the window before predicted."""
    from utils.training.lm import target_mask
    cutter = pack_utils.WindowCutter(4, np.dtype([("length", "<i4"),
                                                  ("text_ids", "<u2", (4,))]), EOS_ID)
    records = np.concatenate([cutter.add(list(range(1, 8))), cutter.finish()])
    assert [r["text_ids"][:r["length"]].tolist() for r in records] == [
        [EOS_ID, 1, 2, 3], [3, 4, 5, 6], [6, 7]]
    import torch
    mask = target_mask(torch.tensor(records["length"], dtype=torch.long), 3)
    assert int(mask.sum()) == 7  # tokens 1..7, each once


def test_without_pack_lines_are_examples_as_before(tmp_path):
    write_bytes(tmp_path / "train.txt", "one line\n\ntwo lines\n")
    prepare("--data_dir", tmp_path)
    split = PreparedSplit(str(tmp_path / "train.npy"))
    assert len(split) == 2 and split.example(0)[-1] == EOS_ID


def test_dev_fraction_with_pack_holds_out_the_last_windows(tmp_path, capsys):
    write_bytes(tmp_path / "train.txt", MIXED * 30)
    prepare("--data_dir", tmp_path, "--pack", "--max_seq_length", 16)
    _, whole = stream_of(tmp_path / "train.npy")
    prepare("--data_dir", tmp_path, "--pack", "--max_seq_length", 16,
            "--dev_fraction", 0.1)
    out = capsys.readouterr()
    assert "holding out 0.1 of train.txt" in out.err
    train, train_ids = stream_of(tmp_path / "train.npy")
    dev, dev_ids = stream_of(tmp_path / "dev.npy")
    assert len(dev) == round(0.1 * (len(train) + len(dev)))
    assert train_ids + dev_ids[1:] == whole  # dev continues where train stops


def test_dev_fraction_without_pack_samples_lines_with_a_seed(tmp_path):
    lines = [f"line number {i}" for i in range(200)]
    write_bytes(tmp_path / "train.txt", "\n".join(lines) + "\n")
    enc = get_encoder()

    def texts(split):
        s = PreparedSplit(str(tmp_path / f"{split}.npy"))
        return [enc.decode(s.example(i)[1:-1]) for i in range(len(s))]

    prepare("--data_dir", tmp_path, "--dev_fraction", 0.05, "--seed", 3)
    train, dev = texts("train"), texts("dev")
    assert len(dev) == 10 and sorted(train + dev) == sorted(lines)
    assert train == [line for line in lines if line not in dev]  # file order kept
    prepare("--data_dir", tmp_path, "--dev_fraction", 0.05, "--seed", 3)
    assert texts("dev") == dev
    prepare("--data_dir", tmp_path, "--dev_fraction", 0.05, "--seed", 4)
    assert texts("dev") != dev


@pytest.mark.parametrize("files, args, words", [
    ({"train.txt": "x\n", "dev.txt": "y\n"}, ["--dev_fraction", "0.1"], "has a dev.txt"),
    ({"test.txt": "x\n"}, ["--dev_fraction", "0.1"], "has none"),
    ({"train.txt": "x\n"}, ["--dev_fraction", "1.5"], "between 0 and 1"),
    ({"train.txt": "short\n"}, ["--pack", "--dev_fraction", "0.5"], "too few"),
    ({"train.txt": "  \n\n"}, ["--pack"], "no non-empty lines"),
])
def test_bad_pack_and_dev_input_is_one_line(tmp_path, capsys, files, args, words):
    for name, text in files.items():
        write_bytes(tmp_path / name, text)
    with pytest.raises(UserError, match=words) as err:
        prepare("--data_dir", tmp_path, *args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "train.npy").exists() and not (tmp_path / "dev.npy").exists()


def test_non_utf8_is_one_line_naming_the_line_with_pack(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"good\nbad \xff here\n")
    with pytest.raises(UserError, match="line 2 is not valid UTF-8"):
        prepare("--data_dir", tmp_path, "--pack")


def test_pack_leaves_no_temporary_file(tmp_path):
    write_bytes(tmp_path / "train.txt", MIXED * 3)
    prepare("--data_dir", tmp_path, "--pack", "--dev_fraction", "0.2",
            "--max_seq_length", 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.npy", "prepared.json",
                                                          "train.npy", "train.txt"]


def test_pool_is_used_for_big_files_only(monkeypatch, tmp_path):
    used = []
    real = prepare_utils.ordered_pool_map
    # pack.py imports the name itself: patch it where it is called.
    monkeypatch.setattr(pack_utils, "ordered_pool_map",
                        lambda f, items, n, **kw: used.append(n) or real(f, items, n, **kw))
    write_bytes(tmp_path / "train.txt", MIXED)
    prepare("--data_dir", tmp_path, "--pack", "--num_workers", 2)
    assert used == [1]
