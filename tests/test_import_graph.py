"""The project's modules import each other without a circle, and at the top
of the file: the graph is read from the source (imports inside functions
included), so a circle hidden behind a function-level import fails too."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("utils",)
ENTRY_SCRIPTS = ("gpt2_generate_main", "gpt2_train_main", "prepare_data",
                 "convert_checkpoint", "gpt2_serve_main")
# Only the project's own imports are held to the top of files: optional
# third-party packages (transformers, tensorboard, ...) and texar may be
# imported late, so that a command that does not use them does not pay for them.


def project_modules():
    """{dotted module name: file path} for utils/ and the entry scripts."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    for script in ENTRY_SCRIPTS:
        path = os.path.join(ROOT, script + ".py")
        if os.path.exists(path):
            modules[script] = path
    return modules


def imported_names(tree):
    """(dotted name, line, at module level) for every import in `tree`;
    `from a import b` gives a.b (a module or a name in a)."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno, id(node) in top_level


def parsed(modules):
    """(module name, path, syntax tree) for each of `modules`."""
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            yield name, path, ast.parse(f.read(), path)


def project_imports():
    """(importing file, line, imported name, at module level) for every import
    of the project's own packages."""
    for _, path, tree in parsed(project_modules()):
        for target, line, top in imported_names(tree):
            if target.split(".")[0] in PACKAGES:
                yield os.path.relpath(path, ROOT), line, target, top


def import_graph(modules):
    graph = {}
    for name, path, tree in parsed(modules):
        edges = set()
        for target, _, _ in imported_names(tree):
            # a.b.c may be module a.b.c or a name in module a.b
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_project_imports_are_at_the_top_of_files():
    late = [f"{path}:{line} {target}" for path, line, target, top in project_imports()
            if not top]
    assert not late, "imports inside functions:\n" + "\n".join(late)


def test_no_private_name_is_imported_across_modules():
    private = [f"{path}:{line} {target}" for path, line, target, _ in project_imports()
               if target.rpartition(".")[2].startswith("_")]
    assert not private, "private names imported:\n" + "\n".join(private)


@pytest.mark.parametrize("package", ["checkpoints", "decoding", "data", "training", "samples",
                                     "serving"])
def test_each_package_says_what_it_owns(package):
    import importlib
    doc = importlib.import_module(f"utils.{package}").__doc__
    assert doc and len(doc.split()) >= 20, f"utils/{package}/__init__.py needs its docstring"
