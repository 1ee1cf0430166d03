"""Test setup: import the project from the repo root, whatever the working directory."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TF_FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "tf_gpt2")


@pytest.fixture(scope="session", autouse=True)
def kernel_store_of_the_test_run(tmp_path_factory):
    """The compiled step's kernel store (utils/decoding/kernel_store.py) in the
    run's temporary directory, never the user's cache: one directory for all
    xdist workers (the parent of each worker's base), so that a model shape's
    kernels are built once per run. Entry scripts run by the tests inherit it."""
    from utils.decoding.kernel_store import CACHE_ENV
    os.environ[CACHE_ENV] = str(tmp_path_factory.getbasetemp().parent / "kernel_store")
    yield


@pytest.fixture
def tf_gpt2_model():
    """load(name) -> (GPT2Decoder with the TF-written fixture's weights, its
    reference metadata: hparams, greedy continuations)."""
    def load(name):
        from utils.model import build_model, hparams_from_openai
        from utils.checkpoints.openai_weights import load_openai_weights
        with open(os.path.join(TF_FIXTURES, "reference", name + ".json")) as f:
            meta = json.load(f)
        model = build_model(hparams_from_openai(meta["hparams"])).eval()
        load_openai_weights(model, os.path.join(TF_FIXTURES, "models", name, "model.ckpt"))
        return model, meta
    return load


@pytest.fixture
def one_thread():
    """One torch thread for the test (modules opt in with
    pytestmark = pytest.mark.usefixtures("one_thread")): training steps on 2
    shared cores stall when threads contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
