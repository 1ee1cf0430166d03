"""utils.checkpoints.tf_reader against checkpoints written by real TensorFlow.

The fixtures (tests/fixtures/tf_gpt2, made by make_fixtures.py there) were
saved by tf.compat.v1.train.Saver; the reference JSON records every tensor's
name, dtype, shape and sha256 as TensorFlow's own reader returned them.
Corrupt variants are made here, in tmp_path, from copies of the fixtures.
"""
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from utils.errors import UserError
from utils.checkpoints.crc32c import crc32c
from utils.checkpoints.tf_reader import (TFCheckpointError, TFCheckpointReader, data_shard_sizes,
                                 mask_crc, resolve_checkpoint_prefix, unmask_crc)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tf_gpt2")
MODELS = os.path.join(FIXTURES, "models")
DATA_FILE = "model.ckpt.data-00000-of-00001"


def reference(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        return json.load(f)


def prefix(name):
    return os.path.join(MODELS, name, "model.ckpt")


def copy_model(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(MODELS, name), dst)
    return dst


def expected_gpt2_variables(hp):
    """OpenAI's GPT-2 variable names and shapes, from the five size numbers."""
    d = hp["n_embd"]
    out = {"model/wte": (hp["n_vocab"], d), "model/wpe": (hp["n_ctx"], d),
           "model/ln_f/g": (d,), "model/ln_f/b": (d,)}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        out.update({
            p + "ln_1/g": (d,), p + "ln_1/b": (d,), p + "ln_2/g": (d,), p + "ln_2/b": (d,),
            p + "attn/c_attn/w": (1, d, 3 * d), p + "attn/c_attn/b": (3 * d,),
            p + "attn/c_proj/w": (1, d, d), p + "attn/c_proj/b": (d,),
            p + "mlp/c_fc/w": (1, d, 4 * d), p + "mlp/c_fc/b": (4 * d,),
            p + "mlp/c_proj/w": (1, 4 * d, d), p + "mlp/c_proj/b": (d,),
        })
    return out


def stored_sha256(reader, name, array):
    """sha256 of the tensor's bytes as TF stores them (bfloat16 = top 16 bits)."""
    if reader.tf_dtype(name) == "bfloat16":
        array = (array.view(np.uint32) >> 16).astype("<u2")
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ------------------------------------------------------------ happy paths ---

@pytest.mark.parametrize("model", ["tiny_a", "tiny_b"])
def test_gpt2_fixture_lists_openai_names_shapes_dtypes(model):
    with open(os.path.join(MODELS, model, "hparams.json")) as f:
        hp = json.load(f)
    with TFCheckpointReader(prefix(model)) as reader:
        listed = reader.variables()
    assert {n: shape for n, (_, shape) in listed.items()} == expected_gpt2_variables(hp)
    assert all(dtype == np.float32 for dtype, _ in listed.values())
    tf_listed = reference(model)["tensors"]  # what TensorFlow itself listed
    assert {n: (str(dt), list(s)) for n, (dt, s) in listed.items()} == \
        {n: (t["dtype"], t["shape"]) for n, t in tf_listed.items()}


@pytest.mark.parametrize("model", ["tiny_a", "tiny_b", "dtypes"])
def test_values_equal_what_tensorflow_read(model):
    tensors = reference(model)["tensors"]
    with TFCheckpointReader(prefix(model)) as reader:
        for name, record in tensors.items():
            array = reader.read(name)
            assert array.shape == tuple(record["shape"])
            assert reader.tf_dtype(name) == record["dtype"]
            assert stored_sha256(reader, name, array) == record["sha256"], name


def test_every_dtype_and_two_shards():
    values = np.load(os.path.join(FIXTURES, "reference", "dtypes.npz"), allow_pickle=False)
    with TFCheckpointReader(prefix("dtypes")) as reader:
        assert reader.num_shards == 2
        listed = reader.variables()
        assert len(listed) == len(values.files) == 13
        for name, (dtype, shape) in listed.items():
            expected = values[name.replace("/", "__")]
            array = reader.read(name)
            assert array.dtype == dtype == expected.dtype, name  # bfloat16 -> float32
            assert array.shape == shape == expected.shape
            np.testing.assert_array_equal(array, expected)
        assert reader.read("float32_scalar").shape == ()
        assert reader.read("empty_float32").shape == (0, 3)
        assert reader.tf_dtype("bfloat16_matrix") == "bfloat16"


def test_read_is_memory_mapped_writable_and_never_changes_the_file(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    before = (model_dir / DATA_FILE).read_bytes()
    reader = TFCheckpointReader(str(model_dir / "model.ckpt"))
    wte = reader.read("model/wte")
    assert not wte.flags.owndata and wte.flags.writeable  # a view of the map
    original = wte[0].copy()
    wte[0] = 123.0
    reader.close()
    assert wte[0, 0] == 123.0  # still usable after close
    assert (model_dir / DATA_FILE).read_bytes() == before
    with TFCheckpointReader(str(model_dir / "model.ckpt")) as again:
        np.testing.assert_array_equal(again.read("model/wte")[0], original)


def test_unknown_variable_suggests_close_names():
    with TFCheckpointReader(prefix("tiny_a")) as reader:
        with pytest.raises(TFCheckpointError, match=r"no variable 'model/h0/attn/c_atn/w'.*"
                                                    r"did you mean model/h0/attn/c_attn/w"):
            reader.read("model/h0/attn/c_atn/w")
        assert "model/wte" in reader and "model/nope" not in reader


def test_error_class_is_a_user_error():
    assert issubclass(TFCheckpointError, UserError)


# ---------------------------------------------------------- corrupt files ---

def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_truncated_data_file(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    data = model_dir / DATA_FILE
    data.write_bytes(data.read_bytes()[:-1000])
    with pytest.raises(TFCheckpointError) as err:
        TFCheckpointReader(str(model_dir / "model.ckpt"))
    message = str(err.value)
    assert str(data) in message and "truncated" in message and "download" in message


def test_flipped_data_byte_is_a_checksum_mismatch_naming_the_tensor(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    flip_byte(model_dir / DATA_FILE, os.path.getsize(model_dir / DATA_FILE) // 2)
    tensors = reference("tiny_a")["tensors"]
    failed = []
    with TFCheckpointReader(str(model_dir / "model.ckpt")) as reader:
        for name in reader.variables():
            try:
                reader.read(name)
            except TFCheckpointError as err:
                failed.append(name)
                assert f"checksum mismatch for tensor '{name}'" in str(err)
                assert DATA_FILE in str(err) and "download" in str(err)
    assert failed == ["model/wte"]  # the middle of the file is in the embedding
    # verify=False skips the check and shows the damage.
    with TFCheckpointReader(str(model_dir / "model.ckpt"), verify=False) as reader:
        changed = [n for n in reader.variables()
                   if stored_sha256(reader, n, reader.read(n)) != tensors[n]["sha256"]]
    assert changed == ["model/wte"]


def test_flipped_index_byte_is_a_corrupt_block(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    index = model_dir / "model.ckpt.index"
    flip_byte(index, index.read_bytes().index(b"model/h0/attn"))
    with pytest.raises(TFCheckpointError, match=r"model\.ckpt\.index is corrupt \(checksum "
                                                r"mismatch.*download"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))


def test_wrong_magic(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    index = model_dir / "model.ckpt.index"
    flip_byte(index, os.path.getsize(index) - 1)
    with pytest.raises(TFCheckpointError, match="not a TensorFlow checkpoint index.*bad magic"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))
    index.write_bytes(b"{}")  # short, unrelated file
    with pytest.raises(TFCheckpointError, match="bad magic"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))


def test_missing_index_and_missing_shard(tmp_path):
    model_dir = copy_model("dtypes", tmp_path)
    (model_dir / "model.ckpt.data-00001-of-00002").unlink()
    with pytest.raises(TFCheckpointError, match=r"model\.ckpt\.data-00001-of-00002 is missing"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))
    (model_dir / "model.ckpt.index").unlink()
    with pytest.raises(TFCheckpointError, match=r"index .*model\.ckpt\.index not found"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))



def test_data_shard_sizes_reads_the_index_alone(tmp_path):
    """The downloader's check: each shard's expected length, before any data file exists."""
    model_dir = copy_model("dtypes", tmp_path)
    data_files = [model_dir / f"model.ckpt.data-0000{k}-of-00002" for k in range(2)]
    lengths = {k: os.path.getsize(path) for k, path in enumerate(data_files)}
    for path in data_files:
        path.unlink()
    index = model_dir / "model.ckpt.index"
    assert data_shard_sizes(str(index)) == (2, lengths)
    flip_byte(index, index.read_bytes().index(b"bfloat16_matrix"))
    with pytest.raises(TFCheckpointError, match=r"model\.ckpt\.index is corrupt \(checksum"):
        data_shard_sizes(str(index))

def patch_header(index_path, old, new):
    """Replace bytes in the first table block (which holds the bundle header)
    and re-seal that block's checksum, so only the header's meaning changes."""
    data = bytes(index_path.read_bytes())
    # The first block ends where its trailer's masked crc matches its bytes.
    end = next(e for e in range(1, len(data) - 4)
               if data[e] == 0 and crc32c(data[:e + 1]) ==
               unmask_crc(struct.unpack_from("<I", data, e + 1)[0]))
    at = data.index(old)
    assert at + len(old) <= end and len(old) == len(new)
    patched = bytearray(data)
    patched[at:at + len(old)] = new
    struct.pack_into("<I", patched, end + 1, mask_crc(crc32c(bytes(patched[:end + 1]))))
    index_path.write_bytes(bytes(patched))


def test_unsupported_version_and_endianness(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    index = model_dir / "model.ckpt.index"
    original = index.read_bytes()
    # Header: num_shards=1 (08 01), version {producer=1} (1a 02 08 01).
    header = b"\x08\x01\x1a\x02\x08\x01"
    assert original.count(header) == 1
    patch_header(index, header, b"\x08\x01\x1a\x02\x10\x05")  # min_consumer=5
    with pytest.raises(TFCheckpointError, match="unsupported checkpoint version"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))
    index.write_bytes(original)
    patch_header(index, header, b"\x08\x01\x10\x01\x20\x00")  # endianness=BIG
    with pytest.raises(TFCheckpointError, match="big-endian"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))


def test_entry_size_disagreeing_with_shape(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    index = model_dir / "model.ckpt.index"
    # model/h0/attn/c_attn/b: float32 [24] -> size 96 (field 5: 28 60).
    entry = b"\x12\x04\x12\x02\x08\x18\x28\x60"
    assert index.read_bytes().count(entry) == 1
    patch_header(index, entry, b"\x12\x04\x12\x02\x08\x18\x28\x5c")
    with pytest.raises(TFCheckpointError, match=r"c_attn/b'.*92 bytes.*needs 96"):
        TFCheckpointReader(str(model_dir / "model.ckpt"))


# ------------------------------------------------------- finding a prefix ---

def test_resolve_prefix_forms(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    want = str(model_dir / "model.ckpt")
    assert resolve_checkpoint_prefix(want) == want
    assert resolve_checkpoint_prefix(want + ".index") == want
    assert resolve_checkpoint_prefix(str(model_dir)) == want  # via the checkpoint file
    # A checkpoint file naming another prefix, relative or absolute.
    for suffix in (".index", ".data-00000-of-00001"):
        os.rename(model_dir / ("model.ckpt" + suffix), model_dir / ("model-7" + suffix))
    (model_dir / "checkpoint").write_text('model_checkpoint_path: "model-7"\n')
    assert resolve_checkpoint_prefix(str(model_dir)) == str(model_dir / "model-7")
    # An absolute path recorded before the directory was moved.
    (model_dir / "checkpoint").write_text(
        'model_checkpoint_path: "/somewhere/else/model-7"\n'
        'all_model_checkpoint_paths: "/somewhere/else/model-7"\n')
    assert resolve_checkpoint_prefix(str(model_dir)) == str(model_dir / "model-7")
    with TFCheckpointReader(resolve_checkpoint_prefix(str(model_dir))) as reader:
        assert reader.read("model/ln_f/g").shape == (8,)


def test_resolve_prefix_without_checkpoint_file(tmp_path):
    model_dir = copy_model("tiny_a", tmp_path)
    (model_dir / "checkpoint").unlink()
    assert resolve_checkpoint_prefix(str(model_dir)) == str(model_dir / "model.ckpt")


def test_resolve_prefix_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TFCheckpointError, match=r"no TensorFlow checkpoint in directory .*empty"
                                                r".*'checkpoint' file nor model\.ckpt\.index"):
        resolve_checkpoint_prefix(str(empty))
    with pytest.raises(TFCheckpointError, match=r"nope/model\.ckpt\.index"):
        resolve_checkpoint_prefix(str(tmp_path / "nope" / "model.ckpt"))
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    with pytest.raises(TFCheckpointError, match=r"names checkpoint 'model\.ckpt' but .*"
                                                r"model\.ckpt\.index does not exist"):
        resolve_checkpoint_prefix(str(stale))
    (stale / "checkpoint").write_text("garbage\n")
    with pytest.raises(TFCheckpointError, match="no model_checkpoint_path"):
        resolve_checkpoint_prefix(str(stale))
    v1 = tmp_path / "model.ckpt"
    v1.write_bytes(b"old")
    with pytest.raises(TFCheckpointError, match="V1 checkpoints"):
        resolve_checkpoint_prefix(str(v1))


# --------------------------------------------------------- masked crc ---

def test_crc_mask_round_trip():
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert unmask_crc(mask_crc(value)) == value
        assert mask_crc(value) != value
