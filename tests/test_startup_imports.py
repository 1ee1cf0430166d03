"""A short generate run imports nothing it does not use (issue 22: start-up time).

A plain process, not tests/script_server.py (whose server has imported
everything already): after the run, which of the packages a short run from
OpenAI's files has no use for are in sys.modules.
"""
import subprocess
import sys

import pytest

from user_files import REPO, TINY_A

NOT_NEEDED = [
    "requests", "urllib3",          # only to download missing files
    "sympy",                        # torch imports it for meta-tensor refs and compiling
    "torch._dynamo", "torch._inductor",  # --compile: a short run is not compiled
    "transformers", "safetensors", "huggingface_hub",  # Hugging Face formats and the Hub
    "tensorboard", "peft",          # training extras
    "pkg_resources",                # texar's one use gets a stand-in (utils/model.py)
    "distutils", "setuptools",      # the same for texar's strtobool
]
REPORT = """
import atexit, runpy, sys
sys.path.insert(0, ".")
names = sys.argv[1].split(",")
atexit.register(lambda: print("IMPORTED", ",".join(n for n in names if n in sys.modules)))
sys.argv = ["gpt2_generate_main.py"] + sys.argv[2:]
runpy.run_path("gpt2_generate_main.py", run_name="__main__")
"""


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_short_run_imports_only_what_it_uses(dtype):
    run = subprocess.run(
        [sys.executable, "-c", REPORT, ",".join(NOT_NEEDED), "--pretrain_model_dir", TINY_A,
         "--prompt", "Hello", "--max_decoding_length", "8", "--dtype", dtype],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = [line for line in run.stdout.splitlines() if line.startswith("IMPORTED")]
    assert report == ["IMPORTED "], report


def test_the_real_modules_follow_texars_stand_ins():
    """The stand-ins texar gets while it imports leave the names free: later
    imports find the real pkg_resources and distutils.util (and texar's
    modules work); the stand-in strtobool answers as the real one."""
    code = ("import sys, warnings; sys.path.insert(0, '.')\n"
            "from utils.model import import_texar, _strtobool\n"
            "tx = import_texar()\n"
            "assert not {'pkg_resources', 'distutils.util'} & set(sys.modules)\n"
            "warnings.simplefilter('ignore')\n"
            "import pkg_resources\n"
            "from distutils.util import strtobool\n"
            "for word in ('y', 'YES', 't', 'True', 'on', '1', 'n', 'No', 'f', 'FALSE',"
            " 'off', '0', 'maybe', ''):\n"
            "    answers = []\n"
            "    for function in (strtobool, _strtobool):\n"
            "        try:\n"
            "            answers.append(function(word))\n"
            "        except ValueError as err:\n"
            "            answers.append(str(err))\n"
            "    assert answers[0] == answers[1], (word, answers)\n"
            "print(hasattr(pkg_resources, 'working_set'), strtobool.__module__,"
            " tx.modules.GPT2Decoder.__name__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "distutils.util", "GPT2Decoder"]
