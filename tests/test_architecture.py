"""The import graph follows the layers of docs/ARCHITECTURE.md: every import (function-level ones included)
points to the same or a lower layer, and no two modules import each other through any chain."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PKG = REPO / "ernie5"

# bottom to top; a module's layer is that of its longest matching prefix (docs/ARCHITECTURE.md, "Layers")
LAYERS = [
    ("base", ["ernie5.errors", "ernie5.constants", "ernie5.env", "ernie5.tensor_io", "ernie5.config"]),
    ("configs", []),  # every `ernie5.<package>.config` module: component config dataclasses
    ("kernels", ["ernie5.kernels"]),
    ("precision", ["ernie5.precision"]),
    ("comm", ["ernie5.comm"]),
    ("model", ["ernie5.model"]),
    ("modality", ["ernie5.modality"]),
    ("data", ["ernie5.data"]),
    ("plan", ["ernie5.plan"]),
    ("optim", ["ernie5.optim"]),
    ("objectives", ["ernie5.objectives"]),
    ("parallel", ["ernie5.parallel"]),
    ("elastic", ["ernie5.elastic"]),
    ("runconfig", ["ernie5.runconfig"]),
    ("train", ["ernie5.train"]),
    ("export", ["ernie5.export"]),
    ("generation", ["ernie5.generation"]),
    ("evaluation", ["ernie5.evaluation"]),
    ("tools", ["ernie5.analysis", "ernie5.tools", "ernie5.bench"]),
    ("sweep", ["ernie5.sweep"]),
    ("cli", ["ernie5.cli", "ernie5.__main__"]),
    ("api", ["ernie5"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def layer_of(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 3 and parts[2] == "config" and parts[1] != "config":
        return 1
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best_len:
                best, best_len = i, len(pre)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return best


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(mod: str) -> set[str]:
    """ernie5 modules `mod` imports anywhere in its body (functions too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "ernie5"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "ernie5":
            for a in node.names:  # `from ernie5 import kernels` imports the module ernie5.kernels
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m in MODULES and m != mod}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_import_points_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: every component must be one module."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not out, out


def test_the_checker_sees_function_level_and_upward_imports(tmp_path):
    """The scan itself: a function-level import is an edge, a TYPE_CHECKING one is not."""
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ernie5.train import trainer\n"
           "def f():\n    from ernie5 import kernels\n")
    MODULES["ernie5.model._probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(src)
    try:
        assert imports_of("ernie5.model._probe") == {"ernie5.kernels"}
        assert layer_of("ernie5.train.config") == 1 and layer_of("ernie5.train.trainer") > layer_of("ernie5.model")
    finally:
        del MODULES["ernie5.model._probe"]


def _modules_loaded_by(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}
    out = subprocess.run([sys.executable, "-c", code + "\nimport os, sys\nprint(sorted(m for m in sys.modules "
                          "if m.split('.')[0] == 'paddle')[:3], os.environ.get('OMP_NUM_THREADS'))"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_config_and_package_import_no_paddle_and_change_no_environment():
    assert _modules_loaded_by("import ernie5.config") == "[] None"
    assert _modules_loaded_by("import ernie5, ernie5.runconfig; ernie5.runconfig.load_config(None)") == "[] None"
    # the explicit call does both
    assert _modules_loaded_by("from ernie5.env import setup; setup()").startswith("['paddle'")
