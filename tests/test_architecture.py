"""The package's shape: no import cycles, pure math in ``mha2mla.ops``, every subpackage says what it owns."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import mha2mla

ROOT = pathlib.Path(mha2mla.__file__).parent
SUBPACKAGES = ("ops", "conversion", "checkpoint", "serve", "heal", "eval", "cli", "demo")
# What pure math must not touch: files, processes, models, the command line, logging.
IMPURE = {"os", "io", "sys", "json", "pathlib", "shutil", "subprocess", "glob", "logging", "pickle", "safetensors",
          "transformers", "accelerate", "click", "tqdm", "yaml", "datasets", "huggingface_hub"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: pathlib.Path, name: str, modules: dict) -> set[str]:
    """The mha2mla modules ``path`` imports anywhere (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mha2mla"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("mha2mla"):
                continue
            for a in node.names:  # `from mha2mla.x import y` imports the module x.y when there is one
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its own modules lazily is not a cycle of the code
    for name in list(graph):
        if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists():
            graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        parts = name.split(".")
        src = parts[1] if len(parts) > 1 else "mha2mla"
        if src == "mha2mla" or src not in SUBPACKAGES:
            continue
        graph.setdefault(src, set()).update(d.split(".")[1] for d in deps
                                            if len(d.split(".")) > 1 and d.split(".")[1] in SUBPACKAGES
                                            and d.split(".")[1] != src)
    for deps in graph.values():
        deps.intersection_update(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_ops_is_pure_math():
    """``mha2mla.ops`` imports only torch, math and the standard library's pure parts, and nothing else of mha2mla."""
    for path in sorted((ROOT / "ops").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in IMPURE, f"{path.name} imports {n}"
                if n.startswith("mha2mla"):
                    assert n.startswith("mha2mla.ops"), f"{path.name} imports {n}: ops must not depend on the rest"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("open", "print", "input"), f"{path.name} calls {node.func.id}()"


def test_the_pure_math_rule_catches_an_impure_module(tmp_path, monkeypatch):
    """The check above would fail on a module that reads a file (so it cannot pass vacuously)."""
    bad = tmp_path / "mha2mla" / "ops"
    bad.mkdir(parents=True)
    (bad / "leaky.py").write_text("import json\n\ndef f(p):\n    return json.load(open(p))\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path / "mha2mla")
    with pytest.raises(AssertionError, match="leaky.py imports json"):
        test_ops_is_pure_math()


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_every_subpackage_says_what_it_owns(sub):
    module = importlib.import_module(f"mha2mla.{sub}")
    assert module.__doc__ and len(module.__doc__.split()) >= 15, f"mha2mla.{sub} needs a docstring of what it owns"


def test_public_api():
    """The names users call stay where the README says they are, also once every module is imported (a submodule
    named like a function would shadow it)."""
    import pkgutil

    for info in pkgutil.walk_packages(mha2mla.__path__, "mha2mla."):
        importlib.import_module(info.name)
    from mha2mla.conversion.pipeline import convert

    assert mha2mla.convert is convert
    assert mha2mla.Method is importlib.import_module("mha2mla.conversion.options").Method
    for package, name in [("mha2mla", "convert"), ("mha2mla", "Method"), ("mha2mla.conversion", "convert"),
                          ("mha2mla.heal", "heal"), ("mha2mla.eval", "evaluate"), ("mha2mla.serve", "absorb"),
                          ("mha2mla.serve", "pad_checkpoint"), ("mha2mla.cli", "main")]:
        obj = getattr(importlib.import_module(package), name)
        assert callable(obj) and not isinstance(obj, type(mha2mla)), f"{package}.{name} is {obj!r}"
