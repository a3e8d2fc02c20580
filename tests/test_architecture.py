"""The package boundaries docs/ARCHITECTURE.md states, checked on the source.

Imports are read statically (every ``import`` statement, type-only ones and
those inside functions included), so a rule holds for code paths no test runs;
two rules are also checked by importing in a fresh interpreter, which catches
what a package pulls in through others.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import registry
import router

REPO = Path(__file__).resolve().parent.parent
INTERNAL = ("registry", "router", "server", "training")
"""The project's top-level packages."""


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module, dotted."""
    target: str
    """The imported module, dotted (``from a import b`` gives ``a.b`` when ``a.b`` is one)."""
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def is_module(dotted: str) -> bool:
    path = REPO / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> Iterator[Import]:
    name = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield Import(name, sub if is_module(sub) else node.module, node.lineno)


def top(dotted: str) -> str:
    return dotted.split(".", 1)[0]


def violations(package: str, allowed: tuple[str, ...]) -> list[str]:
    """Internal imports of ``package`` outside itself and ``allowed`` (prefixes)."""
    found = []
    for path in sources(package):
        for imp in imports_of(path):
            internal = top(imp.target) in INTERNAL
            ok = imp.target.startswith((package, *allowed)) or imp.target == "server"
            if internal and not ok:
                found.append(f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}")
    return found


def test_registry_imports_nothing_internal() -> None:
    assert violations("registry", ()) == []


PURE_LIBRARIES = {"re2"}
"""Third-party libraries the router may use: computation only, no I/O (``re2``: tenants'
routing patterns must match in linear time, which the standard library's ``re`` cannot
promise)."""


def test_router_imports_only_the_standard_library() -> None:
    allowed = {*sys.stdlib_module_names, *PURE_LIBRARIES, "router"}
    found = [
        f"{path.relative_to(REPO)}:{imp.line} imports {imp.target}"
        for path in sources("router")
        for imp in imports_of(path)
        if top(imp.target) not in allowed
    ]
    assert found == []


def test_training_imports_only_the_registry() -> None:
    assert violations("training", ("registry",)) == []


def test_engine_plugin_imports_only_itself_and_the_registry() -> None:
    assert violations("server.engine_plugin", ("registry",)) == []


def test_gateway_imports_no_training_and_no_other_program() -> None:
    allowed = ("registry", "router", "server.config", "server.errors", "server.console")
    assert violations("server.gateway", allowed) == []


def test_rest_apis_do_not_import_the_gateway() -> None:
    allowed = ("registry", "router", "training", "server.config", "server.errors")
    assert violations("server.api", allowed) == []


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_an_engine_process_loads_nothing_of_the_gateway() -> None:
    loaded = loaded_after_import("server.engine_plugin.resolver")
    foreign = {m for m in loaded if top(m) == "server"} - {"server"}
    assert {m for m in foreign if not m.startswith("server.engine_plugin")} == set()


def test_the_gateway_process_loads_no_training_code() -> None:
    loaded = loaded_after_import("server.gateway.app")
    assert {m for m in loaded if top(m) == "training"} == set()


def internal_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in INTERNAL:
        for path in sources(package):
            if "migrations/versions" in str(path):
                continue
            targets = graph.setdefault(module_name(path), set())
            for imp in imports_of(path):
                if top(imp.target) in INTERNAL and is_module(imp.target):
                    targets.add(imp.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among modules (package ``__init__`` re-exports excluded), or None."""
    packages = {m for m in graph if (REPO / m.replace(".", "/") / "__init__.py").is_file()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, set()) - packages):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph.keys() - packages):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_type_only_or_not() -> None:
    assert find_cycle(internal_graph()) is None


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


SHADOWED = {
    *INTERNAL,
    "Scope",
    "Receive",
    "Send",
    "Request",
    "Response",
    *registry.__all__,
    *router.__all__,
}
"""Names a module may import but not define: our packages, framework types, and the
registry's and router's public names outside their own packages."""


def defined_names(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name, node.lineno
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    yield target.id, node.lineno
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.asname and alias.asname != alias.name:
                    yield alias.asname, node.lineno


@pytest.mark.parametrize("package", ["server", "training", "registry", "router"])
def test_no_module_level_name_shadows_a_package_or_framework_type(package: str) -> None:
    own = set(registry.__all__) if package == "registry" else set()
    own |= set(router.__all__) if package == "router" else set()
    found = [
        f"{path.relative_to(REPO)}:{line} defines {name}"
        for path in sources(package)
        for name, line in defined_names(path)
        if name in SHADOWED - own
    ]
    assert found == []


@pytest.mark.parametrize("package", ["server", *(f"server.{p}" for p in
                         ("gateway", "api", "engine_plugin", "cli", "dev")), *INTERNAL[:2],
                         "training"])  # fmt: skip
def test_every_package_says_what_it_owns(package: str) -> None:
    init = REPO / package.replace(".", "/") / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text()))
    assert docstring and len(docstring) > 80, f"{init} needs a docstring: what it owns, imports"
