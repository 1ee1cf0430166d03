"""Fuzz gpt2_generate_main.py's flags: whatever the values, a result or one
error line (exit 0 or 2), never a traceback.

Hypothesis draws combinations of flag values (numbers in and out of range,
huge, negative, NaN, subnormal, junk text), paths that are missing, empty,
directories or the wrong kind of checkpoint, and interactive input that is
not UTF-8. Each run calls main() in-process under run_main, on the tiny
TF-written fixture model (32 positions), so it is quick; nothing is
downloaded (every run names its model directory, and the download mirror
points at a closed port).
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from test_generate_cli import run_script
from utils.checkpoints.weights import checkpoint_model_fields, save_checkpoint
from utils.model import build_model, gpt2_hparams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "tests", "fixtures", "tf_gpt2", "models")
TINY_A, TINY_B = os.path.join(MODELS, "tiny_a"), os.path.join(MODELS, "tiny_b")
# Batches per prompt a drawn run may ask for: --nsamples 10**30 with
# --batch_size 1 is valid, and would just run for ever.
MAX_BATCHES = 4


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files for the path flags: missing, empty, a directory, junk, a config
    that raises, and one real fine-tuned checkpoint."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "empty").write_bytes(b"")
    (root / "junk.ckpt").write_bytes(b"\x80\x04not a checkpoint" * 10)
    (root / "a_dir").mkdir()
    (root / "raises.py").write_text("raise ValueError('config said no')\n")
    (root / "exits.py").write_text("import sys\nsys.exit('config quits')\n")
    (root / "no_hparams.py").write_text("x = 1\n")
    torch.manual_seed(0)
    finetuned = str(root / "model.ckpt")
    hparams = gpt2_hparams(50257, 24, 8, 2, 1)
    save_checkpoint(finetuned, {"model": build_model(hparams).state_dict(),
                                **checkpoint_model_fields(hparams)})
    return {
        "missing": str(root / "nowhere" / "model.ckpt"),
        "missing_dir": str(root / "nowhere"),
        "empty": str(root / "empty"),
        "junk": str(root / "junk.ckpt"),
        "dir": str(root / "a_dir"),
        "raises": str(root / "raises.py"),
        "exits": str(root / "exits.py"),
        "no_hparams": str(root / "no_hparams.py"),
        "finetuned": finetuned,
    }


@pytest.fixture(scope="module", autouse=True)
def no_network():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPT2_DOWNLOAD_BASE_URL", "http://127.0.0.1:9")  # closed port
        yield


# --- what to draw ------------------------------------------------------------

junk_text = st.text(st.characters(blacklist_categories=("Cs",),
                                  blacklist_characters="\x00"), max_size=10)
odd_numbers = st.sampled_from(
    ["", " 7 ", "1_0", "0x10", "1e3", "\u0661\u0662", "nan", "-nan", "inf", "-inf",
     "1e-45", "5e-324", "-0.0", "1e308", "1e309", "9" * 5000, str(2 ** 31 - 1),
     str(2 ** 31), str(2 ** 63), str(-2 ** 63), str(10 ** 30)])
any_float = st.floats(allow_nan=True, allow_infinity=True).map(repr)


odd_values = st.one_of(odd_numbers, any_float, junk_text, st.integers().map(str))


@st.composite
def usual_values(draw):
    """Flag values that work together on the tiny model (32 positions)."""
    batch_size = draw(st.integers(1, 4))
    return {
        "--max_decoding_length": str(draw(st.integers(2, 32))),
        "--batch_size": str(batch_size),
        "--nsamples": str(batch_size * draw(st.integers(1, 3))),
        "--seed": str(draw(st.integers(0, 5))),
        "--top_k": str(draw(st.integers(0, 60000))),
        "--beam_width": str(draw(st.integers(1, 5))),
        "--temperature": repr(draw(st.floats(0.05, 3.0))),
        "--top_p": repr(draw(st.floats(0.01, 1.0))),
        "--length_penalty": repr(draw(st.floats(-10.0, 10.0))),
        "--decoding_strategy": draw(st.sampled_from(["sample", "greedy", "beam"])),
        "--dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
    }


PATH_FLAGS = {  # names of entries of the `paths` fixture, or real files
    "--pretrain_model_dir": ["tiny_b", "missing_dir", "empty", "dir"],
    "--pretrain_checkpoint": ["tiny_a_ckpt", "tiny_b_ckpt", "tiny_a_index", "missing",
                              "junk", "dir"],
    "--checkpoint": ["finetuned", "missing", "empty", "junk", "dir", "tiny_a_ckpt"],
    "--config_model": ["configs.config_model_tiny", "configs.config_model_117M",
                       "configs.nope", "", "raises", "exits", "no_hparams", "missing"],
}


def resolve(name, paths):
    known = {"tiny_a": TINY_A, "tiny_b": TINY_B,
             "tiny_a_ckpt": os.path.join(TINY_A, "model.ckpt"),
             "tiny_b_ckpt": os.path.join(TINY_B, "model.ckpt"),
             "tiny_a_index": os.path.join(TINY_A, "model.ckpt.index")}
    return known.get(name) or paths.get(name, name)


@st.composite
def invocations(draw):
    """(flag -> value, interactive?, stdin bytes, extra argv words, --flag=value?).

    A working set of flags, some left out, then up to two made odd: so that
    many runs generate, and the others fail one or two checks at a time.
    """
    usual = draw(usual_values())
    values = {flag: value for flag, value in usual.items() if draw(st.booleans())}
    # Always in: the default (128) is too long for the tiny model.
    values["--max_decoding_length"] = usual["--max_decoding_length"]
    if "--batch_size" in values:  # the default --nsamples, 1, may not divide
        values["--nsamples"] = usual["--nsamples"]
    values["--pretrain_model_dir"] = "tiny_a"
    for _ in range(draw(st.integers(0, 2))):
        flag = draw(st.sampled_from(sorted(usual) + sorted(PATH_FLAGS)))
        values[flag] = draw(st.sampled_from(PATH_FLAGS[flag]) if flag in PATH_FLAGS
                            else odd_values)
    interactive = draw(st.booleans())
    lines = draw(st.lists(st.one_of(st.binary(max_size=12),
                                    junk_text.map(lambda t: t.encode("utf-8")),
                                    st.just(b"Hello world")), max_size=3))
    extra = (draw(st.sampled_from([["--bogus"], ["stray"], ["--nsamples"], ["-x"]]))
             if draw(st.integers(0, 9)) == 9 else [])  # 0, the simplest: none
    equals_form = draw(st.booleans())
    return values, interactive, b"\n".join(lines), extra, equals_form


def as_int(text, default):
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return None


def runs_too_long(values):
    """Whether a valid --nsamples/--batch_size asks for more than MAX_BATCHES."""
    nsamples = as_int(values.get("--nsamples"), 1)
    batch_size = as_int(values.get("--batch_size"), 1)
    return (nsamples is not None and batch_size is not None
            and nsamples >= 1 and batch_size >= 1 and nsamples % batch_size == 0
            and nsamples // batch_size > MAX_BATCHES)


@settings(max_examples=100, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn=invocations())
def test_any_flag_values_give_a_result_or_one_error_line(drawn, paths):
    values, interactive, stdin, extra, equals_form = drawn
    assume(not runs_too_long(values))
    argv = []
    for flag, value in values.items():
        value = resolve(value, paths) if flag in PATH_FLAGS else value
        argv += [f"{flag}={value}"] if equals_form else [flag, value]
    argv += (["--is_interactive"] if interactive else []) + extra

    code, out, err = run_script(argv, stdin)

    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:  # ours ("error: ...") or argparse's ("prog: error: ...")
        last = err.rstrip().splitlines()[-1]
        assert "error: " in last, (argv, err)
    elif not interactive:
        nsamples = as_int(values.get("--nsamples"), 1)
        assert out.count(" SAMPLE ") == nsamples, (argv, out, err)
