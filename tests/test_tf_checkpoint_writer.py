"""utils.checkpoints.tf_writer: TF V2 bundles that our reader and TensorFlow read back.

The fixtures in tests/fixtures/tf_gpt2 were written by real TensorFlow; their
tensors are rewritten here and read back with utils.checkpoints.tf_reader. For the
GPT-2 fixtures the index must be byte for byte TensorFlow's own. Real
TensorFlow reading our output is checked by
tests/fixtures/tf_gpt2/check_written_with_tf.py in a throwaway venv, and by
the last test here when TensorFlow happens to be installed.
"""
import os
import struct

import numpy as np
import pytest
import torch

from utils.checkpoints.tf_reader import (TFCheckpointReader, _block_entries, _parse_message,
                                 _read_block, _read_table, _varint, unmask_crc)
from utils.checkpoints.tf_writer import (build_table, meta_graph_def, write_tf_checkpoint,
                                        write_tf_checkpoint_dir)
from utils.checkpoints.crc32c import crc32c

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2",
                      "models")


def fixture_items(model, in_file_order=True):
    """(name, array, TF dtype) of a fixture, in TF's data order or name order."""
    reader = TFCheckpointReader(os.path.join(MODELS, model, "model.ckpt"))
    entries = sorted(reader._entries.values(), key=lambda e: (e.shard, e.offset))
    names = [e.name for e in entries] if in_file_order else sorted(reader.variables())
    return reader, [(n, np.array(reader.read(n)), reader.tf_dtype(n)) for n in names]


def assert_reads_back(prefix, reader):
    with TFCheckpointReader(prefix) as ours:  # verify=True: every crc32c checked
        assert ours.variables() == reader.variables()
        for name in reader.variables():
            assert ours.tf_dtype(name) == reader.tf_dtype(name), name
            a, b = ours.read(name), reader.read(name)
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("model", ["tiny_a", "tiny_b"])
def test_gpt2_fixture_rewritten_has_tensorflows_own_index(model, tmp_path):
    reader, items = fixture_items(model)
    written = write_tf_checkpoint(str(tmp_path / "model.ckpt"), items)
    assert list(written) == sorted(reader.variables())
    assert (tmp_path / "model.ckpt.index").read_bytes() == \
        open(os.path.join(MODELS, model, "model.ckpt.index"), "rb").read()
    assert (tmp_path / "model.ckpt.data-00000-of-00001").read_bytes() == \
        open(os.path.join(MODELS, model, "model.ckpt.data-00000-of-00001"), "rb").read()
    assert_reads_back(str(tmp_path / "model.ckpt"), reader)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt.data-00000-of-00001",
                                            "model.ckpt.index"]


def test_every_dtype_scalar_and_empty_tensor_reads_back(tmp_path):
    reader, items = fixture_items("dtypes", in_file_order=False)
    assert {t for _, _, t in items} >= {"bfloat16", "bool", "float16", "int8", "uint8"}
    assert {a.shape for _, a, _ in items} >= {(), (0, 3)}
    items.reverse()  # any order in; the index is sorted
    write_tf_checkpoint(str(tmp_path / "model.ckpt"), iter(items))
    assert_reads_back(str(tmp_path / "model.ckpt"), reader)


def test_torch_tensors_and_bfloat16_rounding(tmp_path):
    bf16 = torch.tensor([[1.0, -2.5], [3.140625, 0.0]], dtype=torch.bfloat16)
    items = [("t/bf16", bf16), ("t/float", torch.arange(6.0).reshape(2, 3)),
             ("t/rounded", np.array([1.00390625, 3.0], np.float32), "bfloat16"),
             ("t/narrowed", np.array([1.5, 2.0]), "float32")]
    assert write_tf_checkpoint(str(tmp_path / "c"), items) == {
        "t/bf16": ("bfloat16", (2, 2)), "t/float": ("float32", (2, 3)),
        "t/narrowed": ("float32", (2,)), "t/rounded": ("bfloat16", (2,))}
    with TFCheckpointReader(str(tmp_path / "c")) as reader:
        assert np.array_equal(reader.read("t/bf16"), bf16.float().numpy())
        assert np.array_equal(reader.read("t/float"), np.arange(6.0).reshape(2, 3))
        assert reader.read("t/rounded").tolist() == [1.0, 3.0]  # round to nearest even
        assert reader.read("t/narrowed").dtype == np.float32


def test_index_is_deterministic_and_every_crc_verifies(tmp_path):
    _, items = fixture_items("dtypes")
    write_tf_checkpoint(str(tmp_path / "a"), items)
    write_tf_checkpoint(str(tmp_path / "b"), items)
    index = (tmp_path / "a.index").read_bytes()
    assert index == (tmp_path / "b.index").read_bytes()
    data = (tmp_path / "a.data-00000-of-00001").read_bytes()
    entries = _read_table(index, "a.index")  # checks every block's crc32c
    assert entries[0][0] == b""
    for key, value in entries[1:]:
        fields = _parse_message(value)
        offset, size = fields.get(4, [0])[0], fields.get(5, [0])[0]
        assert unmask_crc(fields[6][0]) == crc32c(data[offset:offset + size]), key


def test_many_entries_span_blocks_with_restart_points():
    entries = [b"", *[f"var/{i:04d}".encode() for i in range(200)]]
    table = build_table([(k, b"v" * 40) for k in entries], block_size=1024)
    footer = table[-48:-8]
    _, pos = _varint(footer, 0)
    _, pos = _varint(footer, pos)
    blocks = _block_entries(_read_block(table, footer[pos:], "t", "index"), "t")
    assert len(blocks) > 5  # several data blocks, each with restarts every 16 keys
    assert [k for k, _ in _read_table(table, "t")] == entries
    first = _read_block(table, blocks[0][1], "t", "data")
    assert struct.unpack_from("<I", first, len(first) - 4)[0] > 1


def test_bad_input_leaves_nothing(tmp_path):
    def items():
        yield "a", np.zeros(3, np.float32)
        raise RuntimeError("source failed")
    with pytest.raises(RuntimeError):
        write_tf_checkpoint(str(tmp_path / "m"), items())
    with pytest.raises(ValueError, match=r"^tensor name 'a' is empty, not a string, or given "
                                         r"twice$"):
        write_tf_checkpoint(str(tmp_path / "m"), [("a", np.ones(1)), ("a", np.ones(1))])
    with pytest.raises(ValueError, match=r"^tensor 's' has dtype str32, which a TensorFlow "
                                         r"checkpoint cannot hold here"):
        write_tf_checkpoint(str(tmp_path / "m"), [("s", np.array(["x"]))])
    assert os.listdir(tmp_path) == []


def test_directory_has_state_file_and_meta_graph(tmp_path):
    reader, items = fixture_items("tiny_a")
    written = write_tf_checkpoint_dir(str(tmp_path), items)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "model.ckpt.data-00000-of-00001",
                                            "model.ckpt.index", "model.ckpt.meta"]
    assert (tmp_path / "checkpoint").read_text() == \
        open(os.path.join(MODELS, "tiny_a", "checkpoint")).read().rstrip("\n") + "\n"
    assert_reads_back(str(tmp_path / "model.ckpt"), reader)
    meta = _parse_message((tmp_path / "model.ckpt.meta").read_bytes())
    nodes = [_parse_message(n) for n in _parse_message(meta[2][0])[1]]
    variables = {n[1][0].decode() for n in nodes if n[2][0] == b"VariableV2"}
    assert variables == set(written)
    saver = _parse_message(meta[3][0])
    assert (saver[1][0], saver[2][0], saver[3][0], saver[7][0]) == \
        (b"save/Const:0", b"save/control_dependency:0", b"save/restore_all", 2)
    assert meta_graph_def(written) == (tmp_path / "model.ckpt.meta").read_bytes()


def test_real_tensorflow_reads_every_variable(tmp_path):
    tf = pytest.importorskip("tensorflow")  # never in the project's venv; see the docstring
    reader, items = fixture_items("dtypes")
    write_tf_checkpoint_dir(str(tmp_path), items)
    loaded = tf.train.load_checkpoint(str(tmp_path))
    for name in reader.variables():
        want = reader.read(name)  # bfloat16 widened to float32, exactly
        got = loaded.get_tensor(name)
        assert got.shape == want.shape and got.astype(want.dtype).tobytes() == want.tobytes()
