"""README.md and docs/ as a reader meets them: every fenced `bash` and `python`
block runs, in page order (README first, then the pages in the order of its
map), in one copy of the repository, so a block that collides with an earlier
block's output fails here as it would for the reader. The pre-trained GPT-2
the commands name is a 2-layer random model in OpenAI's file format at
gpt2_pretrained_models/model_117M, and my_text/train.txt is a few KB of our
toy sentences. A block that cannot run offline (a download, GPUs, several
machines) carries `<!-- docs-test: skip (reason) -->` on the line before it.

`python X.py ...` in a block goes through tests/script_server.py, a fork server
that imports torch and texar once, so the whole walk takes seconds of work
per command rather than seconds of imports.

Also checked here, without running anything: the front page's length, that
its map lists every page, that every generation and download flag is in
docs/generation.md, that docs/layout.md lists every module, and that every
benchmark section gives its machine and date.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO_ROOT, "tests", "script_server.py")
SKIP_MARK = re.compile(r"^<!-- docs-test: skip \((.+)\) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
RUN_LANGUAGES = ("bash", "sh", "python")
# Not needed by any command, and large.
NOT_COPIED = ("tests/", "benchmarks/", ".ci/")
MY_TEXT_PARAGRAPHS = 12  # of data/toy/train.txt; my_text keeps 5 (3 windows of 512)


def read(path):
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return f.read()


def doc_pages():
    """README.md, then the docs/ pages in the order the README's map lists them."""
    linked = re.findall(r"\]\((docs/[\w.-]+\.md)\)", read("README.md").split(
        "## Where the rest is")[1])
    return ["README.md"] + list(dict.fromkeys(linked))


def blocks(path):
    """(language, code, skip reason or None, line) of each fenced block of a page."""
    lines = read(path).split("\n")
    found, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        before = lines[i - 1] if i else ""
        skip = SKIP_MARK.match(before)
        found.append((fence.group(1), "\n".join(lines[i + 1:end]),
                      skip.group(1) if skip else None, i + 1))
        i = end + 1
    return found


# ------------------------------------------------------------------ cheap checks

def test_front_page_is_short_and_maps_every_page():
    assert len(read("README.md").split("\n")) <= 350
    pages = doc_pages()
    on_disk = sorted(f"docs/{name}" for name in os.listdir(os.path.join(REPO_ROOT, "docs"))
                     if name.endswith(".md"))
    assert sorted(pages[1:]) == on_disk
    for path in ("benchmarks/README.md", "examples/README.md"):
        assert f"]({path})" in read("README.md")


def test_every_block_is_run_or_says_why_not():
    for page in doc_pages():
        for language, code, skip, line in blocks(page):
            assert language in ("",) + RUN_LANGUAGES, f"{page}:{line}: ```{language}"
            if skip is not None:
                assert language in RUN_LANGUAGES and skip.strip(), f"{page}:{line}"
            assert "[--" not in code, f"{page}:{line}: optional flags in brackets " \
                                      f"do not run as written"


def flags_of(help_text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_]*)", help_text))


def help_of(parse_args, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def test_generation_and_download_flags_are_documented(capsys):
    import gpt2_generate_main
    from utils.checkpoints import download
    generation = read("docs/generation.md")
    table = "\n".join(line for line in generation.split("\n") if line.startswith("| `-"))
    for script, parse_args in (("gpt2_generate_main.py", gpt2_generate_main.parse_args),
                               ("download_model.sh", download.parse_args)):
        flags = flags_of(help_of(parse_args, capsys)) - {"--help"}
        missing = {flag for flag in flags if f"`{flag}" not in table}
        assert not missing, f"{script} flags missing from docs/generation.md: {missing}"
    # Prompt framing and what --max_decoding_length counts, on both pages.
    for text in (read("README.md"), generation):
        assert "no `<|endoftext|>`" in text and "max_new_tokens" in text


def test_layout_lists_every_module_once():
    layout = read("docs/layout.md")
    sections = dict(re.findall(r"^## `(utils/[\w/]*)`[^\n]*\n(.*?)(?=^## |\Z)", layout,
                               re.M | re.S))
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, "utils")):
        package = os.path.relpath(folder, REPO_ROOT) + "/"
        modules = [f for f in files if f.endswith(".py") and f != "__init__.py"]
        if not modules:
            continue
        assert package in sections, f"docs/layout.md has no section for {package}"
        listed = re.findall(r"^- `([\w.]+)`: \S", sections[package], re.M)
        assert sorted(listed) == sorted(modules), package


def test_every_benchmark_section_says_machine_and_date():
    sections = re.split(r"^## ", read("benchmarks/README.md"), flags=re.M)[1:]
    assert sections
    for section in sections:
        title = section.split("\n")[0]
        assert "Machine:" in section and re.search(r"Dates?:\s.*?20\d\d-\d\d-\d\d", section,
                                                   re.S), title


# ------------------------------------------------------------------ the walk

@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """A copy of the repository with a tiny stand-in for GPT-2 117M and my_text/."""
    root = tmp_path_factory.mktemp("reader") / "repo"
    for name in repository_files():
        source = os.path.join(REPO_ROOT, name)
        if not name or name.startswith(NOT_COPIED) or not os.path.isfile(source):
            continue
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        shutil.copy2(source, os.path.join(root, name))
    make_stand_in_gpt2(root, tmp_path_factory.mktemp("stand_in"))
    toy = read("data/toy/train.txt").split("\n")
    paragraphs = [" ".join(toy[i::MY_TEXT_PARAGRAPHS]) for i in range(MY_TEXT_PARAGRAPHS)][:5]
    os.makedirs(root / "my_text")
    (root / "my_text" / "train.txt").write_text("\n\n".join(paragraphs) + "\n",
                                                 encoding="utf-8")
    return root


def repository_files():
    """The files of the working tree a clean clone would have, plus new ones
    not yet committed (git's view; without git, a walk skipping what
    .gitignore names)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"],
                                cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return listed.stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        skipped = (".git", ".venv", "gpt2_pretrained_models", "__pycache__", "my_text",
                   "my_out", "exported")
        names = []
        for folder, dirs, files in os.walk(REPO_ROOT):
            dirs[:] = [d for d in dirs if d not in skipped and not d.startswith("output")]
            names += [os.path.relpath(os.path.join(folder, f), REPO_ROOT) for f in files
                      if not f.endswith((".npy", ".pyc")) and f != "prepared.json"]
        return names


def make_stand_in_gpt2(root, work):
    """gpt2_pretrained_models/model_117M: OpenAI's files of a 2-layer random
    GPT-2 with GPT-2's vocabulary and 1024 positions, written by our converter."""
    import torch
    import convert_checkpoint
    from utils.checkpoints.openai_files import default_model_dir
    from utils.checkpoints.weights import (CHECKPOINT_FORMAT, checkpoint_model_fields,
                                           save_checkpoint)
    from utils.model import build_model, gpt2_hparams
    torch.manual_seed(0)
    hparams = gpt2_hparams(50257, 1024, 8, 2, 2)
    model = build_model(hparams)
    ckpt = str(work / "stand_in.ckpt")
    save_checkpoint(ckpt, {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                           **checkpoint_model_fields(hparams, False)})
    target = os.path.join(root, default_model_dir("117M"))
    assert convert_checkpoint.main([ckpt, target, "--format", "openai"]) == 0


@pytest.fixture(scope="session")
def fork_server(sandbox, tmp_path_factory):
    socket_path = str(tmp_path_factory.mktemp("sock") / "docs.sock")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, RUNNER, "serve", socket_path, "--no-compile"], cwd=sandbox,
                              env=env, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    yield socket_path
    subprocess.run([sys.executable, "-S", RUNNER, "stop", socket_path])
    server.wait(timeout=30)


BASH_PRELUDE = """
python() {
  case "${1-}" in
    *.py) command python -S "$DOCS_RUNNER" run "$DOCS_SOCKET" "$@" ;;
    *) command python "$@" ;;
  esac
}
"""


def test_every_command_runs_in_reading_order(sandbox, fork_server, tmp_path):
    env = dict(os.environ, DOCS_RUNNER=RUNNER, DOCS_SOCKET=fork_server,
               OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    ran, timings = 0, []
    for page in doc_pages():
        for number, (language, code, skip, line) in enumerate(blocks(page)):
            if skip is not None or language not in RUN_LANGUAGES:
                continue
            if language == "python":
                script = tmp_path / f"block_{ran}.py"
                script.write_text(code + "\n", encoding="utf-8")
                code = f"python {script}"
            start = time.perf_counter()
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", BASH_PRELUDE + code],
                                  cwd=sandbox, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=300)
            timings.append((time.perf_counter() - start, f"{page}:{line}"))
            assert proc.returncode == 0, (
                f"{page} line {line} failed (exit {proc.returncode}):\n{code}\n"
                f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
            ran += 1
    assert ran >= 10
    print("\n".join(f"{seconds:6.1f} s  {where}" for seconds, where in timings))
