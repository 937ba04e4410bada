"""The code's layout: which package may import which, read from the source (nothing compiles).

- bdjax, the library, never imports the programs built on it (launch/), the converters
  (checkpoints_convert/) or the measurement tools (bench/), not even inside a function.
- bdjax has no import cycle. The graph's nodes are bdjax's modules, a package being its
  __init__.py; an edge is an import statement anywhere in a file (inside functions too: a
  function-level import is still a dependency, only a later one), except under
  `if TYPE_CHECKING:`, which never runs. `from bdjax.x import y` is an edge to bdjax.x.y where
  that is a module, else to bdjax.x; `import bdjax.x.y` is an edge to bdjax.x.y (not to the
  packages above it: a package's __init__ importing its submodules, which import each other by
  their full names, is not a cycle in practice). A package __init__'s lazy re-exports (imports
  inside its module-level `__getattr__`, run when a missing attribute is asked for, after the
  package is initialised) are not edges of the package: `from bdjax import BlendedDiffusion` is
  an edge to the module __getattr__ imports for that name (bdjax.editor), while
  `from bdjax import __version__` (a plain attribute) is an edge to bdjax's __init__ alone, whose
  only edges are its top-level imports.
- The installed packages (setup.py's find_packages: bdjax, checkpoints_convert, launch) load none
  of the test-only references (torch, kornia, guided_diffusion, clip, the lpips pip package) nor
  gradio when imported: a user without them imports every module.
- bench/ and tests/ are not installed, so nothing installed imports them.
- A launch program (edit, batch_edit, extrapolate, app) imports only the shared launch modules
  (launch.cli, launch.runtime, launch.platform) and its own parts (launch.studio is the app's),
  never another program or another program's part.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_BDJAX = ("launch", "checkpoints_convert", "bench")
NOT_AT_IMPORT = ("torch", "kornia", "guided_diffusion", "clip", "lpips", "gradio")
LAUNCH_SHARED = ("launch", "launch.cli", "launch.runtime", "launch.platform")
# A program split into modules: each part is imported by its program only.
PROGRAM_PARTS = {"launch.studio": "launch.app"}


# ---------------------------------------------------------------------------------------------
# Reading imports from the source.

def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path = ROOT) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def python_files(package: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import statement of a file as (module, names, where): `import a.b` is ("a.b", [], ...),
    `from a import b, c` is ("a", ["b", "c"], ...), relative imports resolved; `where` is the
    name of the module-level function it is in ("" at module level) or "TYPE_CHECKING"."""

    def __init__(self, name: str, is_package: bool):
        self.package = name.split(".") if is_package else name.split(".")[:-1]
        self.found, self.where = [], ""

    def visit_FunctionDef(self, node):
        where, self.where = self.where, self.where or node.name
        self.generic_visit(node)
        self.where = where

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if _is_type_checking(node.test):
            where, self.where = self.where, "TYPE_CHECKING"
            for child in node.body:
                self.visit(child)
            self.where = where
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node):
        self.found += [(alias.name, [], self.where) for alias in node.names]

    def visit_ImportFrom(self, node):
        module = node.module or ""
        if node.level:
            base = self.package[:len(self.package) - (node.level - 1)]
            module = ".".join([*base, *([module] if module else [])])
        self.found.append((module, [alias.name for alias in node.names], self.where))


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, list[str], str]]:
    visitor = _Imports(module_name(path, root), path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return visitor.found


def imported_modules(path: Path, root: Path = ROOT, *, skip_type_checking: bool = False) -> set[str]:
    """The modules `path` imports, anywhere in the file: `from a import b` names a.b where that is
    a module, else a."""
    found = set()
    for module, names, where in imports(path, root):
        if skip_type_checking and where == "TYPE_CHECKING":
            continue
        found.add(module)
        found.update(f"{module}.{n}" for n in names if is_module(f"{module}.{n}", root))
    return found


def lazy_exports(init: Path, root: Path = ROOT) -> dict[str, set[str]]:
    """A package __init__'s lazy re-exports: name -> the modules its module-level `__getattr__`
    imports under the `if` that tests for that name."""
    lazy = {}
    tree = ast.parse(init.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            for branch in ast.walk(node):
                if not isinstance(branch, ast.If):
                    continue
                names = [c.value for c in ast.walk(branch.test) if isinstance(c, ast.Constant)
                         and isinstance(c.value, str)]
                targets = set()
                for statement in branch.body:
                    for child in ast.walk(statement):
                        if isinstance(child, ast.ImportFrom):
                            targets.update(f"{child.module}.{a.name}" if is_module(f"{child.module}.{a.name}", root)
                                           else child.module for a in child.names)
                        elif isinstance(child, ast.Import):
                            targets.update(a.name for a in child.names)
                for name in names:
                    lazy.setdefault(name, set()).update(targets)
    return lazy


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """`package`'s modules -> the modules of `package` each imports (the rules of this file's
    docstring)."""
    files = {module_name(p, root): p for p in python_files(package, root)}
    lazy = {name: lazy_exports(p, root) for name, p in files.items() if p.name == "__init__.py"}
    graph = {name: set() for name in files}

    def inside(module):
        return module == package or module.startswith(package + ".")

    for name, path in files.items():
        for module, names, where in imports(path, root):
            if where == "TYPE_CHECKING" or not inside(module):
                continue
            if where == "__getattr__" and path.name == "__init__.py":
                continue  # lazy re-exports: edges of the importers of those names (below)
            if not names:
                graph[name].add(module)
            for n in names:
                if is_module(f"{module}.{n}", root):
                    graph[name].add(f"{module}.{n}")
                elif n in lazy.get(module, {}):
                    graph[name].update(m for m in lazy[module][n] if inside(m))
                else:
                    graph[name].add(module)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def setup_packages() -> list[str]:
    """What setup.py installs: its find_packages(include=...) run on this checkout."""
    import setuptools

    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == "find_packages"]
    assert len(calls) == 1, "setup.py should call find_packages once"
    keywords = {k.arg: ast.literal_eval(k.value) for k in calls[0].keywords}
    assert set(keywords) == {"include"}, keywords
    return sorted(setuptools.find_packages(where=str(ROOT), include=keywords["include"]))


# ---------------------------------------------------------------------------------------------
# The rules.

def test_bdjax_imports_none_of_the_programs_converters_or_tools():
    offending = []
    for path in python_files("bdjax"):
        for module in imported_modules(path):
            if module.split(".")[0] in OUTSIDE_BDJAX:
                offending.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offending, "\n".join(offending)


def test_bdjax_has_no_import_cycle():
    graph = import_graph("bdjax")
    assert "bdjax.editor" in graph["bdjax.blended"] or "bdjax.blended" in graph["bdjax.editor"]  # not vacuous
    found = cycles(graph)
    explained = []
    for component in found:
        members = set(component)
        explained.append(", ".join(component) + ": " + "; ".join(
            f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in component))
    assert not found, "import cycles in bdjax:\n" + "\n".join(explained)


def test_the_graph_reads_every_kind_of_import(tmp_path):
    """The reader on a made-up package: function-level and relative imports are edges, a
    TYPE_CHECKING import is not, a lazy re-export is an edge to its module, not to the package."""
    def write(name, text):
        path = tmp_path.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("pkg/__init__.py", "__version__ = '1'\n\ndef __getattr__(name):\n"
          "    if name in ('Thing', 'Other'):\n        from pkg import b\n        return b.Thing\n"
          "    if name == 'C':\n        from pkg.sub import c\n        return c.C\n    raise AttributeError(name)\n")
    write("pkg/a.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
          "def f():\n    from . import b\n")
    write("pkg/b.py", "from pkg import __version__\nimport pkg.sub.c\n")
    write("pkg/sub/__init__.py", "")
    write("pkg/sub/c.py", "from ..a import f\nfrom pkg import Thing\n")
    write("pkg/d.py", "import pkg.a\n")
    graph = import_graph("pkg", tmp_path)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg", "pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a", "pkg.b"}, "pkg.d": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    write("pkg/sub/c.py", "from pkg import __version__\n")
    assert cycles(import_graph("pkg", tmp_path)) == []


def test_bench_and_tests_are_not_installed_and_nothing_installed_imports_them():
    packages = setup_packages()
    assert {"bdjax", "bdjax.models", "checkpoints_convert", "launch"} <= set(packages), packages
    unshipped = [p for p in packages if p.split(".")[0] in ("bench", "tests")]
    assert not unshipped, unshipped
    offending = []
    for top in sorted({p.split(".")[0] for p in packages}):
        for path in python_files(top):
            for module in imported_modules(path, skip_type_checking=True):
                if module.split(".")[0] in ("bench", "tests"):
                    offending.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offending, "\n".join(offending)


IMPORT_EVERYTHING = r"""
import importlib, json, pkgutil, sys

packages, watched = json.loads(sys.argv[1])
loaded = lambda: {name.split(".")[0] for name in sys.modules} & set(watched)
report = {"modules": [], "failed": {}, "brought": {}, "before": sorted(loaded())}
for package in packages:
    names = [package]
    try:
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__, package + ".",
                                                        onerror=lambda name: report["failed"].setdefault(
                                                            name, repr(sys.exc_info()[1])))]
    except Exception as e:
        report["failed"][package] = repr(e)
    for name in names:
        before = loaded()
        try:
            importlib.import_module(name)
        except Exception as e:
            report["failed"][name] = repr(e)
            continue
        report["modules"].append(name)
        if loaded() - before:
            report["brought"][name] = sorted(loaded() - before)
print(json.dumps(report))
"""


def test_installed_modules_import_without_the_test_references_or_gradio():
    """Every module of the installed packages, imported one after the other in a fresh process:
    none fails to import, and none brings torch, kornia, guided_diffusion, clip, lpips (the pip
    package; bdjax.models.lpips is ours) or gradio (launch.app imports it when it builds its page)."""
    top = sorted({p.split(".")[0] for p in setup_packages()})
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING, json.dumps([top, NOT_AT_IMPORT])], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["before"] == [], report["before"]
    assert not report["failed"], report["failed"]
    every = {module_name(p) for package in top for p in python_files(package)}
    assert set(report["modules"]) == every, every ^ set(report["modules"])
    assert "launch.app" in report["modules"] and "bdjax.models.lpips" in report["modules"]
    assert not report["brought"], report["brought"]


@pytest.mark.parametrize("program", ["edit", "batch_edit", "extrapolate", "app", "evaluate"])
def test_a_launch_program_imports_only_the_shared_launch_modules(program):
    path = ROOT / "launch" / f"{program}.py"
    assert path.is_file(), path
    used = {m for m in imported_modules(path) if m.split(".")[0] == "launch"}
    own = {part for part, owner in PROGRAM_PARTS.items() if owner == f"launch.{program}"}
    assert used <= set(LAUNCH_SHARED) | own, used - set(LAUNCH_SHARED) - own


def test_no_launch_module_imports_a_program_or_another_programs_part():
    programs = {module_name(p) for p in python_files("launch")} - set(LAUNCH_SHARED) - set(PROGRAM_PARTS)
    assert programs >= {"launch.edit", "launch.batch_edit", "launch.extrapolate", "launch.app"}, programs
    offending = []
    for path in python_files("launch"):
        name = module_name(path)
        for module in imported_modules(path):
            if module in programs or any(module.startswith(p + ".") for p in programs):
                offending.append(f"{path.relative_to(ROOT)} imports {module}")
            elif module in PROGRAM_PARTS and PROGRAM_PARTS[module] not in (name, PROGRAM_PARTS.get(name)):
                offending.append(f"{path.relative_to(ROOT)} imports {module}, a part of {PROGRAM_PARTS[module]}")
    assert not offending, "\n".join(offending)
