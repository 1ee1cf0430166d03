"""gpt2_generate_main.py end to end, on TF-written tiny checkpoints.

The greedy continuations to match were computed by Hugging Face transformers'
GPT-2 from the same TensorFlow files (tests/fixtures/tf_gpt2/README.md).
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import gpt2_generate_main
from utils import errors
from utils.checkpoints.weights import checkpoint_model_fields, save_checkpoint
from utils.errors import UserError
from utils.model import build_model, gpt2_hparams
from utils.processor import get_encoder
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
SAMPLE_RE = re.compile(r"=+ SAMPLE (\d+) =+\n(.*?)\n(?==+( SAMPLE|\n))", re.S)


def fixture(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        return os.path.join(FIXTURES, "models", name), json.load(f)


def run_cli(args, stdin="", env=None):
    return script_server.run([sys.executable, "gpt2_generate_main.py", *args],
                          input=stdin, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=300)


def samples(stdout):
    return [text for _, text, _ in SAMPLE_RE.findall(stdout)]


def test_interactive_top_k_1_prints_the_reference_greedy_continuation():
    """The 'done when' of the generation issue, through a real subprocess.
    Uncompiled: tests/test_compiled_step.py runs the interactive default
    (--compile auto) against the same references."""
    encoder = get_encoder()
    for name in ("tiny_a", "tiny_b"):
        model_dir, ref = fixture(name)
        n_ctx = ref["hparams"]["n_ctx"]
        prompts = [g["prompt_text"] for g in ref["greedy"]]
        stdin = prompts[0] + "\n\n" + prompts[1] + "\n"  # an empty line in between
        result = run_cli(["--pretrain_model_dir", model_dir,
                          "--pretrain_checkpoint", os.path.join(model_dir, "model.ckpt"),
                          "--is_interactive", "--top_k", "1", "--compile", "off",
                          "--max_decoding_length", str(n_ctx)], stdin)
        assert result.returncode == 0, result.stderr
        assert "Prompt should not be empty!" in result.stdout
        assert result.stdout.count("Model input >>> ") == 4  # 3 lines, then EOF
        expected = [encoder.decode(g["output_ids"][len(g["prompt_ids"]):])
                    for g in ref["greedy"]]
        assert samples(result.stdout) == expected
        assert "Traceback" not in result.stderr


def test_bad_flag_gives_one_line_and_exit_2():
    model_dir, _ = fixture("tiny_a")
    result = run_cli(["--pretrain_model_dir", model_dir, "--temperature", "0"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --temperature must be > 0 (got 0.0): a finite number such as 0.7; "
        "lower is more conservative"]


def test_missing_model_files_and_no_network_give_one_error_line(tmp_path):
    closed = "http://127.0.0.1:9"  # discard port: nothing listens there
    result = run_cli(["--pretrain_model_dir", str(tmp_path / "model_117M")],
                     env={"GPT2_DOWNLOAD_BASE_URL": closed, "GPT2_DOWNLOAD_BACKOFF": "0"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model_117M" in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0].rstrip())  # the last word
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "model_117M" / "model.ckpt.index")


# --- in-process runs: quicker, same code path -------------------------------

def run_main(argv, stdin="", monkeypatch=None, capsys=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = gpt2_generate_main.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_samples_from_scratch_in_batches_and_seeded(monkeypatch, capsys):
    model_dir, _ = fixture("tiny_b")
    argv = ["--pretrain_model_dir", model_dir, "--nsamples", "4", "--batch_size", "2",
            "--max_decoding_length", "20", "--temperature", "1.5", "--top_k", "0"]
    _, first, _ = run_main(argv + ["--seed", "1"], monkeypatch=monkeypatch, capsys=capsys)
    _, again, _ = run_main(argv + ["--seed", "1"], monkeypatch=monkeypatch, capsys=capsys)
    _, other, _ = run_main(argv + ["--seed", "2"], monkeypatch=monkeypatch, capsys=capsys)
    assert [int(n) for n, _, _ in SAMPLE_RE.findall(first)] == [1, 2, 3, 4]
    assert first.rstrip().endswith("=" * 80)
    assert first == again
    assert first != other


def test_greedy_strategy_equals_top_k_1(monkeypatch, capsys):
    model_dir, ref = fixture("tiny_a")
    prompt = ref["greedy"][1]["prompt_text"] + "\n"
    common = ["--pretrain_model_dir", model_dir, "--is_interactive",
              "--max_decoding_length", "20"]
    _, greedy, _ = run_main(common + ["--decoding_strategy", "greedy"], prompt,
                            monkeypatch, capsys)
    _, top1, _ = run_main(common + ["--top_k", "1"], prompt, monkeypatch, capsys)
    assert samples(greedy) == samples(top1) and samples(greedy)[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_follows_the_reference(dtype):
    """--dtype runs the same engine on 16-bit weights: the next-token logits stay
    close to the reference's, and the greedy continuation starts the same."""
    from utils.checkpoints.weights import load_weights, resolve_model
    from utils.decoding.generation import next_token_logits
    for name in ("tiny_a", "tiny_b"):
        model_dir, ref = fixture(name)
        model = load_weights(resolve_model(pretrain_model_dir=model_dir)).model.eval()
        full = next_token_logits(model, [ref["greedy"][0]["prompt_ids"]])
        half = next_token_logits(model.to(getattr(torch, dtype)),
                                 [ref["greedy"][0]["prompt_ids"]]).float()
        assert half.dtype == torch.float32 and full.shape == half.shape
        tolerance = 0.1 if dtype == "bfloat16" else 0.01
        assert (half - full).abs().max() < tolerance * full.abs().max()
        result = run_cli(["--pretrain_model_dir", model_dir, "--is_interactive",
                          "--decoding_strategy", "greedy", "--max_decoding_length",
                          str(len(ref["greedy"][0]["prompt_ids"]) + 3), "--dtype", dtype],
                         ref["greedy"][0]["prompt_text"] + "\n")
        assert result.returncode == 0 and f"({dtype})" in result.stderr, result.stderr
        g = ref["greedy"][0]
        expected = get_encoder().decode(g["output_ids"][len(g["prompt_ids"]):][:3])
        assert samples(result.stdout) == [expected]


def test_prompt_too_long_is_reported_and_the_session_goes_on(monkeypatch, capsys):
    model_dir, ref = fixture("tiny_a")
    too_long = " ".join(["word"] * 40)  # 40 tokens; the model has 32 positions
    stdin = too_long + "\n" + ref["greedy"][0]["prompt_text"] + "\n"
    code, out, err = run_main(["--pretrain_model_dir", model_dir, "--is_interactive",
                               "--max_decoding_length", "32", "--top_k", "1"],
                              stdin, monkeypatch, capsys)
    assert code == 0
    assert "error: the prompt is 40 tokens" in err and "32" in err
    assert len(samples(out)) == 1
    assert out.count("SAMPLE") == 1  # no banner for the refused prompt


def test_nsamples_per_prompt_in_interactive_mode(monkeypatch, capsys):
    model_dir, _ = fixture("tiny_a")
    _, out, _ = run_main(["--pretrain_model_dir", model_dir, "--is_interactive",
                          "--nsamples", "3", "--max_decoding_length", "12",
                          "--seed", "0"], "Hello\n", monkeypatch, capsys)
    assert [int(n) for n, _, _ in SAMPLE_RE.findall(out)] == [1, 2, 3]


def test_finetuned_checkpoint_is_used_over_pretrained(tmp_path, monkeypatch, capsys):
    hparams = gpt2_hparams(50257, 24, 8, 2, 1)
    path = str(tmp_path / "model.ckpt")
    save_checkpoint(path, {"model": build_model(hparams).state_dict(),
                           **checkpoint_model_fields(hparams)})
    code, out, err = run_main(["--checkpoint", path, "--pretrain_checkpoint",
                               str(tmp_path / "absent" / "model.ckpt"),
                               "--max_decoding_length", "24", "--seed", "3"],
                              "", monkeypatch, capsys)
    assert code == 0 and len(samples(out)) == 1
    assert "fine-tuned checkpoint" in err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--nsamples", "3", "--batch_size", "2"], "must be divisible by --batch_size"),
    (["--max_decoding_length", "33"], "between 2 and the model's 32 positions"),
    (["--top_p", "1.5"], r"--top_p must be in \(0, 1\]"),
    (["--top_k", "-2"], "--top_k must be >= 0"),
    (["--beam_width", "0"], "--beam_width must be between 1 and"),
    (["--checkpoint", "no/such/model.ckpt"], "checkpoint not found"),
    (["--config_model", "configs.nope"], "unknown config"),
])
def test_bad_flags_are_user_errors(args, message, monkeypatch, capsys):
    model_dir, _ = fixture("tiny_a")
    with pytest.raises(UserError, match=message):
        run_main(["--pretrain_model_dir", model_dir, *args], "", monkeypatch, capsys)


def test_top_p_alone_replaces_the_default_top_k():
    from utils.decoding.settings import SamplingSettings

    def top_k(argv):
        return SamplingSettings.from_flags(gpt2_generate_main.parse_args(argv)).top_k
    assert top_k(["--top_p", "0.9"]) == 0
    assert top_k(["--top_p", "0.9", "--top_k", "5"]) == 5
    assert top_k([]) == 40


@pytest.mark.parametrize("seed", [str(2 ** 70), str(2 ** 32), "-1"])
def test_seed_out_of_range_is_a_user_error(seed):
    from utils.decoding.settings import SamplingSettings
    with pytest.raises(UserError, match=r"--seed must be between 0 and 4294967295"):
        SamplingSettings.from_flags(gpt2_generate_main.parse_args(["--seed", seed]))


def test_largest_seed_is_accepted_by_both_scripts():
    """One seed range for sampling and training: numpy's, 0 to 2**32 - 1."""
    import gpt2_train_main
    from utils.decoding.limits import MAX_SEED
    from utils.decoding.settings import SamplingSettings
    args = gpt2_generate_main.parse_args(["--seed", str(MAX_SEED)])
    assert SamplingSettings.from_flags(args).seed == 2 ** 32 - 1
    args = gpt2_train_main.parse_args(["--do_test", "--seed", str(MAX_SEED)])
    assert gpt2_train_main.check_args(args).sampling.seed == MAX_SEED


@pytest.fixture
def hparams_server(monkeypatch):
    """A local download mirror serving only the 124M hparams.json (404 for the
    weights); points the downloader at it and returns the paths requested."""
    import http.server
    import threading

    requested = []
    hparams = json.dumps({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
                          "n_head": 12, "n_layer": 12}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            if self.path.endswith("/hparams.json"):
                self.send_response(200)
                self.send_header("Content-Length", str(len(hparams)))
                self.end_headers()
                self.wfile.write(hparams)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GPT2_DOWNLOAD_BASE_URL",
                       f"http://127.0.0.1:{server.server_address[1]}")
    yield requested
    server.shutdown()


def test_impossible_length_fails_before_the_weights_are_downloaded(
        tmp_path, monkeypatch, capsys, hparams_server):
    """Only hparams.json is fetched before --max_decoding_length is checked."""
    with pytest.raises(UserError, match="model's 1024 positions"):
        run_main(["--pretrain_model_dir", str(tmp_path / "model_117M"),
                  "--max_decoding_length", "5000"], "", monkeypatch, capsys)
    assert hparams_server == ["/124M/hparams.json"]


# --- the script as run: exit code and stderr, from main() in-process ---------

def run_script(argv, stdin=b""):
    """main(argv) under run_main, as the script runs it: (exit code, stdout,
    stderr). stdin is bytes behind a UTF-8 text stream, like a process's."""
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                errors.run_main(gpt2_generate_main.main, argv)
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr):
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(code, stderr, *words):
    assert code == 2, stderr
    errors_ = error_lines(stderr)
    assert len(errors_) == 1 and stderr.rstrip().endswith(errors_[0]), stderr
    for word in words:
        assert word in errors_[0]


INT_LIMIT = str(2 ** 31)  # one more than --batch_size/--beam_width allow


@pytest.mark.parametrize("args,words", [
    (["--temperature", "nan"], ["--temperature must be > 0 (got nan)"]),
    (["--temperature", "inf"], ["--temperature must be > 0 (got inf)"]),
    (["--temperature=-inf"], ["--temperature must be > 0 (got -inf)"]),
    (["--temperature", "0"], ["--temperature must be > 0 (got 0.0)"]),
    (["--temperature", "1e-45"], ["--temperature 1e-45 is too small", "1.18e-38",
                                  "--decoding_strategy greedy"]),
    (["--top_p", "nan"], ["--top_p must be in (0, 1] (got nan)"]),
    (["--top_p", "inf"], ["--top_p must be in (0, 1] (got inf)"]),
    (["--length_penalty", "nan"], ["--length_penalty", "-10 and 10", "(got nan)"]),
    (["--length_penalty=-inf"], ["--length_penalty", "(got -inf)"]),
    (["--length_penalty", "1e308"], ["--length_penalty", "(got 1e+308)"]),
    (["--batch_size", INT_LIMIT, "--nsamples", INT_LIMIT], ["--batch_size", "at most"]),
    (["--decoding_strategy", "beam", "--beam_width", INT_LIMIT], ["--beam_width"]),
    (["--nsamples", "-3"], ["--nsamples and --batch_size must be at least 1"]),
    (["--seed", "-1"], ["--seed must be between 0"]),
    (["--max_decoding_length", "-5"], ["--max_decoding_length must be at least 2"]),
])
def test_bad_numbers_are_refused_before_any_download(args, words, tmp_path,
                                                     hparams_server):
    model_dir = tmp_path / "model_117M"  # missing: would be downloaded
    code, out, err = run_script(["--pretrain_model_dir", str(model_dir), *args])
    assert_one_line_error(code, err, *words)
    assert hparams_server == [] and not model_dir.exists()
    assert out == ""


@pytest.mark.parametrize("args", [
    ["--batch_size", str(2 ** 31 - 1), "--nsamples", str(2 ** 31 - 1)],
    ["--decoding_strategy", "beam", "--beam_width", str(2 ** 31 - 1)],
])
def test_batch_or_beam_too_big_for_memory_is_refused_before_the_weights_download(
        args, tmp_path, hparams_server):
    model_dir = tmp_path / "model_117M"
    code, _, err = run_script(["--pretrain_model_dir", str(model_dir), *args])
    assert_one_line_error(code, err, "generating 2147483647 row(s) of up to 128 tokens",
                          "key/value cache", "needs about", "is free: use a smaller "
                          "--batch_size, --beam_width or --max_decoding_length")
    assert hparams_server == ["/124M/hparams.json"]  # never the weights
    assert "hparams.json" in os.listdir(model_dir)
    assert not [name for name in os.listdir(model_dir) if "model.ckpt" in name]


def test_memory_check_compares_with_the_free_memory_before_reading_weights(monkeypatch):
    """Even the default flags are refused when the machine has 1 MiB free; the
    checkpoint's weights are never read."""
    import utils.checkpoints.openai_weights
    read = []
    monkeypatch.setattr(utils.checkpoints.openai_weights, "load_openai_weights",
                        lambda *a: read.append(a))
    monkeypatch.setattr("utils.memory.available_bytes", lambda device=None: 2 ** 20)
    model_dir, _ = fixture("tiny_a")
    code, _, err = run_script(["--pretrain_model_dir", model_dir, "--is_interactive",
                               "--max_decoding_length", "20"], b"Hello\n")
    assert_one_line_error(code, err, "generating 1 row(s) of up to 20 tokens",
                          "weights 1.5 MiB")
    assert re.search(r"needs about [\d.]+ MiB but only 1.0 MiB of (RAM|GPU) is free",
                     err)
    assert read == []


def failing_allocations(monkeypatch, times):
    """Make the next `times` KV-cache allocations fail as the allocator does."""
    from utils.decoding.generation import _GPT2
    real_new_cache = _GPT2.new_cache
    left = [times]

    def new_cache(self, rows, slots):
        if left[0]:
            left[0] -= 1
            torch.empty(2 ** 62, dtype=torch.uint8)  # raises the real error
        return real_new_cache(self, rows, slots)
    monkeypatch.setattr(_GPT2, "new_cache", new_cache)


def test_allocation_failure_while_generating_is_one_line(monkeypatch):
    failing_allocations(monkeypatch, 1)
    model_dir, _ = fixture("tiny_a")
    code, out, err = run_script(["--pretrain_model_dir", model_dir, "--batch_size", "2",
                                 "--nsamples", "2", "--max_decoding_length", "20"])
    assert_one_line_error(code, err, "ran out of memory generating 2 sample(s) of up "
                          "to 20 tokens: use a smaller --batch_size")
    assert samples(out) == []


def test_allocation_failure_in_a_session_is_reported_and_it_goes_on(monkeypatch):
    failing_allocations(monkeypatch, 1)
    model_dir, _ = fixture("tiny_a")
    # --compile off: compiling at start-up would make the first allocation.
    code, out, err = run_script(["--pretrain_model_dir", model_dir, "--is_interactive",
                                 "--max_decoding_length", "20", "--seed", "0",
                                 "--compile", "off"],
                                b"Hello\nHello again\n")
    assert code == 0
    assert len(error_lines(err)) == 1 and "ran out of memory" in err
    assert len(samples(out)) == 1 and out.count("Model input >>> ") == 3


def test_non_utf8_input_is_reported_and_asked_again(monkeypatch):
    """A bad line, a good one, then a bad last line without a newline."""
    model_dir, ref = fixture("tiny_a")
    g = ref["greedy"][0]
    stdin = (b"\xff\xfe not text\n" + g["prompt_text"].encode() + b"\ncaf\xc3")
    code, out, err = run_script(["--pretrain_model_dir", model_dir, "--is_interactive",
                                 "--top_k", "1", "--max_decoding_length", "32"], stdin)
    assert code == 0
    assert error_lines(err) == ["error: that input is not valid UTF-8 text: type or "
                                "paste the prompt again as UTF-8"] * 2
    assert out.count("Model input >>> ") == 4  # 3 lines, then EOF
    expected = get_encoder().decode(g["output_ids"][len(g["prompt_ids"]):])
    assert samples(out) == [expected]


def test_non_utf8_input_through_a_real_process():
    model_dir, _ = fixture("tiny_a")
    result = subprocess.run(
        [sys.executable, "gpt2_generate_main.py", "--pretrain_model_dir", model_dir,
         "--is_interactive", "--max_decoding_length", "12", "--seed", "0"],
        input=b"\x80abc\nHello\n", capture_output=True, cwd=REPO, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert len(error_lines(stderr)) == 1 and "not valid UTF-8" in stderr
    assert len(samples(result.stdout.decode())) == 1


def test_undecodable_bytes_as_surrogates_are_refused_too(monkeypatch, capsys):
    """Python in the C locale hands undecodable bytes over as lone surrogates."""
    model_dir, _ = fixture("tiny_a")
    code, out, err = run_main(["--pretrain_model_dir", model_dir, "--is_interactive",
                               "--max_decoding_length", "12"], "ab\udcff\nHello\n",
                              monkeypatch, capsys)
    assert code == 0 and "not valid UTF-8" in err and len(samples(out)) == 1


def test_closed_stdin_ends_the_session_cleanly(monkeypatch, capsys):
    model_dir, _ = fixture("tiny_a")
    monkeypatch.setattr(sys, "stdin", None)
    code = gpt2_generate_main.main(["--pretrain_model_dir", model_dir,
                                    "--is_interactive", "--max_decoding_length", "12"])
    out, err = capsys.readouterr()
    assert code == 0 and out == "Model input >>> \n" and "error" not in err


def test_tiny_temperature_samples_what_greedy_decoding_gives(monkeypatch, capsys):
    """1e-37 is a normal float32: logits / 1e-37 overflow, yet sampling works
    and picks the most likely token every time."""
    model_dir, ref = fixture("tiny_a")
    prompt = ref["greedy"][0]["prompt_text"] + "\n"
    common = ["--pretrain_model_dir", model_dir, "--is_interactive",
              "--max_decoding_length", "32", "--top_k", "0", "--seed", "1"]
    _, tiny, _ = run_main(common + ["--temperature", "1e-37"], prompt, monkeypatch,
                          capsys)
    _, greedy, _ = run_main(common + ["--decoding_strategy", "greedy"], prompt,
                            monkeypatch, capsys)
    assert samples(tiny) == samples(greedy) and samples(tiny)[0]
