"""The batch-1 CPU decoding step through torch.compile (utils/decoding/compiled_step.py,
turned on by utils/decoding/compiling.py) and gpt2_generate_main.py --compile.

The references are the eager engine (utils/decoding/engine.py) and, on the
TF-written fixtures, the greedy continuations Hugging Face transformers
computed from the same TensorFlow files."""
import copy
import os
import sys

import pytest
import torch

from utils.decoding import compiled_step, compiling
from utils.decoding.generation import generate
from utils.decoding.engine import engine_for
from utils.model import build_model, gpt2_hparams
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
NEVER = -1


def small_model(seed=5, n_embd=32):
    torch.manual_seed(seed)
    model = build_model(gpt2_hparams(n_vocab=300, n_ctx=48, n_embd=n_embd, n_head=4,
                                     n_layer=2)).eval()
    return model.requires_grad_(False)


def compiled(model):
    reason = compiling.compile_step(model)
    if reason is not None and "torch.compile failed" in reason:
        pytest.skip(f"no working torch.compile here: {reason}")
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
    if "fbgemm" in torch.backends.quantized.supported_engines:
        from utils.decoding.int8_linear import quantize_for_decoding
        model = quantize_for_decoding(small_model())
        assert "int8" in compiling.compile_step(model)


def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch):
    def broken(eps):
        raise RuntimeError("no C++ compiler\nlong details")
    monkeypatch.setattr(compiled_step, "_kernels", broken)
    model = small_model(seed=9)
    reason = compiling.compile_step(model)
    assert reason == "torch.compile failed: no C++ compiler"
    assert not compiled_step.is_enabled(model) and not engine_for(model).compiled
    assert len(generate(model, [[1, 2]], 10, strategy="greedy", end_token=NEVER)[0]) == 8


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
    if mode == "off":
        assert "Compiling" not in result.stderr
    else:  # interactive: auto compiles too (except on Intel CPUs, see pays_off_here)
        assert "Compiled in" in result.stderr or "decoding uncompiled" in result.stderr
    from utils.processor import get_encoder
    expected = get_encoder().decode(case["output_ids"][len(case["prompt_ids"]):])
    assert expected.strip() in result.stdout


@pytest.mark.parametrize("vendor, mode, compiles", [("GenuineIntel", "auto", False),
                                                    ("GenuineIntel", "on", True),
                                                    ("AuthenticAMD", "auto", True),
                                                    ("", "auto", True)])
def test_compile_auto_skips_cpus_where_the_eager_step_is_faster(monkeypatch, capsys,
                                                                vendor, mode, compiles):
    from utils.decoding import loading
    compiled_models = []
    monkeypatch.setattr(compiled_step, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(loading, "timed_compile_step",
                        lambda model: (compiled_models.append(model), (None, 0.5))[1])
    monkeypatch.setattr(loading, "freeze_garbage_collector", lambda: None)
    model = small_model()
    loading.turn_on_compiled_step(model, mode)
    assert compiled_models == ([model] if compiles else [])
    err = capsys.readouterr().err
    assert ("Compiled in 0.5 s." in err) == compiles
    assert ("the uncompiled step is the faster one" in err) == (not compiles)
