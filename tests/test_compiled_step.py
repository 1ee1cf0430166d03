"""The batch-1 CPU decoding step through compiled kernels (utils/decoding/compiled_step.py,
stored by utils/decoding/kernel_store.py, turned on by utils/decoding/compiling.py)
and gpt2_generate_main.py --compile.

The references are the eager engine (utils/decoding/engine.py) and, on the
TF-written fixtures, the greedy continuations Hugging Face transformers
computed from the same TensorFlow files. The kernels are built once per model
shape into the test run's store (tests/conftest.py); the small models here
share tiny_a's shape, so the run builds two shapes (about a minute each on 2
cores)."""
import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from utils.decoding import compiled_step, compiling, kernel_store
from utils.decoding.generation import generate
from utils.decoding.engine import engine_for
from utils.model import build_model, gpt2_hparams
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
NEVER = -1


def small_model(seed=5):
    """A random model of tiny_a's shape (the same kernels)."""
    torch.manual_seed(seed)
    model = build_model(gpt2_hparams(n_vocab=50257, n_ctx=48, n_embd=8, n_head=2,
                                     n_layer=2)).eval()
    return model.requires_grad_(False)


def compiled(model):
    reason = compiling.compile_step(model)
    if reason is not None and "compiling failed" in reason:
        pytest.skip(f"no working C++ compiler for AOTInductor here: {reason}")
    assert reason is None, reason
    return model


@pytest.mark.parametrize("name", ["tiny_a", "tiny_b"])
def test_compiled_greedy_matches_transformers_on_tf_checkpoints(name, tf_gpt2_model):
    model, meta = tf_gpt2_model(name)
    compiled(model.requires_grad_(False))
    for case in meta["greedy"]:
        prompt, expected = case["prompt_ids"], case["output_ids"]
        out = generate(model, [prompt], len(expected), strategy="greedy",
                       end_token=NEVER)
        assert prompt + out[0] == expected


def test_compiled_step_equals_the_eager_step():
    eager = small_model()
    fast = compiled(copy.deepcopy(eager))
    assert engine_for(fast).compiled and not engine_for(eager).compiled
    for context in ([1, 2, 3], [7], list(range(20, 45))):
        a = compiling.step_logits(eager, context)
        b = compiling.step_logits(fast, context)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        assert (generate(fast, [context], 47, strategy="greedy", end_token=NEVER)
                == generate(eager, [context], 47, strategy="greedy", end_token=NEVER))
    # Sampling draws from the same distribution: the same seed, the same ids.
    sampled = [generate(model, [[4, 5, 6]], 40, strategy="sample", top_k=20,
                        generator=torch.Generator().manual_seed(11), end_token=NEVER)
               for model in (eager, fast)]
    assert sampled[0] == sampled[1]


def test_batches_and_beams_keep_the_eager_path():
    eager = small_model()
    fast = compiled(copy.deepcopy(eager))
    contexts = [[1, 2, 3], [9, 8]]
    assert (generate(fast, contexts, 30, strategy="greedy", end_token=NEVER)
            == generate(eager, contexts, 30, strategy="greedy", end_token=NEVER))
    assert (generate(fast, [[1, 2, 3]], 20, strategy="beam", beam_width=3, end_token=NEVER)
            == generate(eager, [[1, 2, 3]], 20, strategy="beam", beam_width=3,
                        end_token=NEVER))


def test_the_compiled_step_follows_changed_weights():
    eager = small_model()
    fast = compiled(copy.deepcopy(eager))
    for model in (eager, fast):
        with torch.no_grad():
            model.decoder.self_attns[0].V_dense.weight.mul_(-2.0)
            model.decoder.poswise_networks[1]._layers[0].bias.add_(0.5)
    assert engine_for(fast).compiled  # the rebuilt engine keeps it
    context = [3, 1, 4, 1, 5]
    assert torch.allclose(compiling.step_logits(fast, context),
                          compiling.step_logits(eager, context),
                          rtol=1e-4, atol=1e-5)


def test_unsupported_models_get_a_reason_and_stay_eager():
    model = small_model().to(torch.bfloat16)
    assert "float32" in compiling.compile_step(model)
    assert not engine_for(model).compiled
    mixed = small_model()
    mixed.decoder.poswise_layer_norm[1].eps = 1e-3  # the last layer's second norm
    assert compiling.compile_step(mixed) == "it needs one layer-norm epsilon throughout"
    assert not engine_for(mixed).compiled
    if "fbgemm" in torch.backends.quantized.supported_engines:
        from utils.decoding.int8_linear import quantize_for_decoding
        model = quantize_for_decoding(small_model())
        assert "int8" in compiling.compile_step(model)


def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch, tmp_path):
    def broken(function, arguments, path):
        raise RuntimeError("no C++ compiler\nlong details")
    monkeypatch.setenv(kernel_store.CACHE_ENV, str(tmp_path / "store"))
    monkeypatch.setattr(kernel_store, "_compile_library", broken)
    model = small_model(seed=9)
    reason = compiling.compile_step(model)
    assert reason == "compiling failed: no C++ compiler"
    assert not compiled_step.is_enabled(model) and not engine_for(model).compiled
    assert len(generate(model, [[1, 2]], 10, strategy="greedy", end_token=NEVER)[0]) == 8


def test_stored_kernels_are_reused_and_load_without_the_compiler(monkeypatch):
    compiled(small_model())  # built (or already stored) for this shape
    def must_not_compile(function, arguments, path):
        raise AssertionError("compiled again although stored")
    monkeypatch.setattr(kernel_store, "_compile_library", must_not_compile)
    other = small_model(seed=21)
    assert compiling.has_stored_kernels(other)
    assert compiling.compile_step(other, build=False) is None
    assert engine_for(other).compiled
    # A fresh process loads them without importing torch's compiler.
    code = ("import sys, torch\n"
            "sys.path.insert(0, '.')\n"
            "from utils.model import build_model, gpt2_hparams\n"
            "from utils.decoding import compiling\n"
            "model = build_model(gpt2_hparams(n_vocab=50257, n_ctx=48, n_embd=8, n_head=2,"
            " n_layer=2)).eval().requires_grad_(False)\n"
            "assert compiling.compile_step(model, build=False) is None\n"
            "print(sorted(m for m in ('torch._inductor', 'torch._dynamo', 'sympy')"
            " if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_stored_kernels_means_no_build_without_asking(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_store.CACHE_ENV, str(tmp_path / "store"))
    model = small_model()
    assert not compiling.has_stored_kernels(model)
    assert compiling.compile_step(model, build=False) == (
        "no compiled kernels are stored for this model yet")
    assert not engine_for(model).compiled
    assert not (tmp_path / "store").exists()


def test_a_store_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(kernel_store.CACHE_ENV, str(blocker / "store"))
    model = small_model()
    reason = compiling.compile_step(model)
    assert reason.startswith("cannot create the compiled step's kernel store")
    assert reason.endswith(f"point {kernel_store.CACHE_ENV} at a directory you can write")
    assert not engine_for(model).compiled


def store_a_copy(tmp_path, monkeypatch):
    """Point the store at `tmp_path` and fill it with the run store's build
    for small_model's shape; the build's directory."""
    signature = compiled_step.signature(engine_for(compiled(small_model())))
    built = kernel_store.stored_kernels_dir(signature)
    monkeypatch.setenv(kernel_store.CACHE_ENV, str(tmp_path / "store"))
    directory = kernel_store._private_dirs(signature)
    for name in compiled_step.KERNEL_NAMES:
        shutil.copy2(os.path.join(built, f"{name}.so"), directory)
    assert compiling.has_stored_kernels(small_model())
    return directory


@pytest.mark.parametrize("tamper", ["store_writable_by_others", "library_writable_by_group",
                                    "library_is_a_symlink"])
def test_a_store_others_could_write_is_never_loaded(tmp_path, monkeypatch, tamper):
    directory = store_a_copy(tmp_path, monkeypatch)
    library = os.path.join(directory, "mlp_then_logits.so")
    if tamper == "store_writable_by_others":
        os.chmod(os.path.dirname(directory), 0o777)
    elif tamper == "library_writable_by_group":
        os.chmod(library, 0o620)
    else:
        real = library + ".real"
        os.rename(library, real)
        os.symlink(real, library)
    model = small_model()
    assert not compiling.has_stored_kernels(model)
    reason = compiling.compile_step(model, build=False)
    assert "only you can write" in reason and kernel_store.CACHE_ENV in reason
    assert not engine_for(model).compiled
    # The command refuses in one line (on), or says so and decodes uncompiled (auto).
    common = ["--pretrain_model_dir", os.path.join(FIXTURES, "models", "tiny_a"),
              "--prompt", "Hello", "--max_decoding_length", "12"]
    refused = run_cli([*common, "--compile", "on"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --compile on:")
    allowed = run_cli([*common, "--compile", "auto", "--max_decoding_length", "30",
                       "--nsamples", "5"])
    assert allowed.returncode == 0, allowed.stderr
    if compiled_step.pays_off_here():  # auto tries only where it pays
        assert "note: decoding uncompiled" in allowed.stderr


def test_the_store_key_covers_torch_cpu_threads_and_shape(monkeypatch):
    signature = compiled_step.signature(engine_for(small_model()))
    key = kernel_store._store_key(signature)
    assert kernel_store._store_key(signature) == key
    other_shape = compiled_step.signature(engine_for(build_model(gpt2_hparams(
        n_vocab=50257, n_ctx=48, n_embd=12, n_head=3, n_layer=2)).eval()))
    assert kernel_store._store_key(other_shape) != key
    for module, name, value in [(kernel_store, "cpu_identity", lambda: "another CPU"),
                                (kernel_store.torch, "__version__", "9.9.9")]:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, value)
            assert kernel_store._store_key(signature) != key
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert kernel_store._store_key(signature) != key
    finally:
        torch.set_num_threads(threads)


def run_cli(args):
    return script_server.run([sys.executable, "gpt2_generate_main.py", *args],
                          input="Hello world\n", capture_output=True, text=True,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("extra", [["--batch_size", "2", "--nsamples", "2"],
                                   ["--dtype", "bfloat16"],
                                   ["--decoding_strategy", "beam"]])
def test_compile_on_refuses_what_it_cannot_compile(extra):
    model_dir = os.path.join(FIXTURES, "models", "tiny_a")
    result = run_cli(["--is_interactive", "--compile", "on", "--pretrain_model_dir",
                      model_dir, "--max_decoding_length", "12", *extra])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --compile on needs")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_generate_cli_compile_modes_give_transformers_greedy_text(mode):
    import json
    with open(os.path.join(FIXTURES, "reference", "tiny_a.json")) as f:
        case = json.load(f)["greedy"][0]
    model_dir = os.path.join(FIXTURES, "models", "tiny_a")
    result = run_cli(["--is_interactive", "--compile", mode, "--decoding_strategy",
                      "greedy", "--pretrain_model_dir", model_dir,
                      "--max_decoding_length", str(len(case["output_ids"]))])
    assert result.returncode == 0, result.stderr
    compiles = mode == "on" or mode == "auto" and compiled_step.pays_off_here()
    assert ("Compiled decoding step ready" in result.stderr) == compiles
    from utils.processor import get_encoder
    expected = get_encoder().decode(case["output_ids"][len(case["prompt_ids"]):])
    assert expected.strip() in result.stdout


@pytest.mark.parametrize("mode, pays_off, stored, worth_building, runs, builds",
                         [("auto", True, True, False, True, False),
                          ("auto", True, False, False, False, False),
                          ("auto", True, False, True, True, True),
                          ("auto", False, True, True, False, False),
                          ("on", True, False, False, True, True),
                          ("on", False, False, False, True, True),
                          ("on", True, True, False, True, False)])
def test_compile_auto_loads_stored_kernels_and_builds_for_long_sessions(
        monkeypatch, capsys, mode, pays_off, stored, worth_building, runs, builds):
    from utils.decoding import loading
    calls = []
    monkeypatch.setattr(compiled_step, "pays_off_here", lambda: pays_off)
    monkeypatch.setattr(loading, "has_stored_kernels", lambda model: stored)
    monkeypatch.setattr(loading, "timed_compile_step",
                        lambda model, build: (calls.append(build), (None, 0.5))[1])
    loading.turn_on_compiled_step(small_model(), mode, worth_building)
    assert calls == ([mode == "on" or worth_building] if runs else [])
    err = capsys.readouterr().err
    assert ("Compiled decoding step ready in 0.50 s." in err) == runs
    assert ("Compiling the decoding step" in err) == builds


@pytest.mark.parametrize("vendor, pays_off", [("GenuineIntel", False),
                                              ("AuthenticAMD", True), ("", True)])
def test_the_compiled_step_pays_off_except_on_intel_cpus(monkeypatch, vendor, pays_off):
    monkeypatch.setattr(compiled_step, "cpu_vendor", lambda: vendor)
    assert compiled_step.pays_off_here() == pays_off


def test_generate_cli_auto_uses_stored_kernels_only_for_runs_that_repay_them(tmp_path,
                                                                           monkeypatch):
    store_a_copy(tmp_path, monkeypatch)
    common = ["--pretrain_model_dir", os.path.join(FIXTURES, "models", "tiny_a"),
              "--prompt", "Hello", "--decoding_strategy", "greedy"]
    short = run_cli([*common, "--max_decoding_length", "12"])
    longer = run_cli([*common, "--max_decoding_length", "30", "--nsamples", "5"])
    for result in (short, longer):
        assert result.returncode == 0, result.stderr
        assert "Compiling" not in result.stderr
    assert "Compiled decoding step ready" not in short.stderr
    # Not on Intel CPUs, where the compiled step is not the faster one.
    assert ("Compiled decoding step ready" in longer.stderr) == compiled_step.pays_off_here()


@pytest.mark.parametrize("mode, long_session, tokens, expected", [
    ("auto", False, 127, None),
    ("auto", False, 128, ("auto", False)),
    ("auto", True, 12, ("auto", True)),
    ("on", False, 12, ("on", False)),
    ("off", True, 5000, None)])
def test_generate_asks_for_the_compiled_step_by_run_length(monkeypatch, mode, long_session,
                                                           tokens, expected):
    import argparse
    import gpt2_generate_main
    calls = []
    monkeypatch.setattr(gpt2_generate_main, "turn_on_compiled_step",
                        lambda model, how, worth_building: calls.append((how, worth_building)))
    args = argparse.Namespace(compile=mode, dtype="float32", batch_size=1,
                              decoding_strategy="greedy")
    assert gpt2_generate_main.STORED_KERNELS_MIN_TOKENS == 128
    gpt2_generate_main.prepare_compiled_step(object(), args, torch.device("cpu"),
                                             long_session, tokens)
    assert calls == ([] if expected is None else [expected])
