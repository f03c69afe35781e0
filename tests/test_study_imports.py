"""How the packages import each other: no import cycle anywhere, the layers of docs/design.md, and a study tool
that needs neither torch nor Lightning to analyse a pool.

The import graph is read from the source with ``ast`` (nothing is imported): an edge for every ``import`` and
``from ... import`` of a project module, module-level ones and those inside functions alike (a lazy import
still runs the imported module in the same process, so it closes a cycle as surely as an eager one); only
imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("formats", "lightning_modules", "datamodules", "callbacks", "cli_support", "studies", "benchmarks")
LAYERS = {
    "formats": -1,
    "lightning_modules": 0,
    "datamodules": 1,
    "callbacks": 1,
    "cli_support": 2,
    "studies": 3,
    "cli": 4,
    "benchmarks": 5,
}
"""docs/design.md, "Import direction": a package imports only packages of a lower layer (or its own)."""


def project_modules() -> dict[str, Path]:
    """Every module of the project packages and ``cli``, by dotted name (``flatminima.<package>...``; the
    benchmarks, not part of the package, as ``benchmarks.<script>``)."""
    modules = {"flatminima.cli": ROOT / "cli.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            prefix = [] if package == "benchmarks" else ["flatminima"]
            modules[".".join(prefix + parts)] = path
    return modules


def layer(module: str) -> int:
    """The layer of a module's package (``flatminima.studies.runner`` → ``studies`` → 3)."""
    return LAYERS[module.removeprefix("flatminima.").split(".")[0]]


class _Imports(ast.NodeVisitor):
    """The project modules one module imports, wherever the import statement is (but ``if TYPE_CHECKING:``)."""

    def __init__(self, name: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.name, self.is_package, self.modules = name, is_package, modules
        self.found: set[str] = set()

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            full = f"{module}.{alias.name}"
            self._add(full if full in self.modules else module)

    def _add(self, dotted: str) -> None:
        while dotted and dotted not in self.modules:  # `import a.b.c` of a name inside module a.b
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != self.name:
            self.found.add(dotted)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = visitor.found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (empty exactly when the graph has none)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_reader_sees_relative_lazy_and_dotted_imports():
    modules = {"p": Path("p/__init__.py"), "p.a": Path("p/a.py"), "p.b": Path("p/b.py"), "q": Path("q.py")}
    source = textwrap.dedent("""
        from . import b
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import q
        def f():
            import p.b.thing
            from . import nothing
    """)
    visitor = _Imports("p.a", False, modules)
    visitor.visit(ast.parse(source))
    assert visitor.found == {"p.b", "p"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycle_between_project_modules():
    assert cycles(import_graph()) == []


def test_packages_import_only_lower_layers():
    upward = sorted(
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []


BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "lightning", "pytorch_lightning"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

    sys.meta_path.insert(0, Blocker())
""")


ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def without_torch(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which importing torch or Lightning raises."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )


def test_the_blocker_blocks():
    out = without_torch("import torch")
    assert out.returncode == 1 and "blocked by the test" in out.stderr


STUDY_MODULES = """
    import studies, flatminima.studies.analysis, flatminima.studies.commands, flatminima.studies.cli, flatminima.studies.figures, flatminima.studies.board
    import flatminima.studies.runner, flatminima.studies.engines.local, flatminima.studies.engines.ray, flatminima.studies.pool, flatminima.studies.report, flatminima.formats.summary
    print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning", "pytorch_lightning"}))
"""


def test_studies_import_neither_torch_nor_lightning():
    """Where both are installed, importing the study tool still imports neither (without them: the next test)."""
    installed = subprocess.run(
        [sys.executable, "-c", "import sys" + textwrap.dedent(STUDY_MODULES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == "[]"


def test_study_analyze_runs_without_torch_and_lightning(tmp_path):
    from test_study_analysis import synthetic_study

    directory = synthetic_study(tmp_path)
    out = without_torch(
        textwrap.dedent(STUDY_MODULES)
        + textwrap.dedent(f"""
        import runpy
        sys.argv = ["cli.py", "study", "analyze", {str(directory)!r}, "--bootstrap", "50"]
        try:
            runpy.run_path({str(ROOT / "cli.py")!r}, run_name="__main__")
        except SystemExit as done:
            print("exit", done.code, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning")))
    """)
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "exit", "0", "[]"], out.stderr
    assert (directory / "analysis.md").is_file() and (directory / "results.csv").is_file()
    assert len(list((directory / "figures").glob("*.png"))) == 12  # as test_study_analysis lists them
    assert list((directory / "tensorboard").rglob("events.out.tfevents.*"))


def test_the_summary_type_is_defined_once_and_run_results_are_built_in_the_runner():
    """One ``Summary`` (formats/summary.py, a TypedDict), no ``dict[str, Any]`` alias of it; ``RunResult(...)`` is
    called in studies/runner.py only."""
    definitions, constructions = [], []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "Summary":
                definitions.append((name, "class"))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "Summary" for t in targets):
                    definitions.append((name, "alias"))
            elif (
                isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "RunResult"
            ):
                constructions.append(name)
    assert definitions == [("flatminima.formats.summary", "class")]
    assert set(constructions) == {"flatminima.studies.runner"}
    from flatminima.formats.summary import Summary

    assert Summary.__annotations__["metrics"] and Summary.__total__ is False  # a TypedDict
