"""The house's layers point down, read from the code's own imports (function bodies included): `app/core`
imports no other package of the app, only the web layer knows the web framework, packages import each
other without a cycle, and the product never imports a test double."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
WEB_FRAMEWORK = ("fastapi", "starlette")


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(APP.rglob("*.py")):
        parts = path.relative_to(APP.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports_of(module: str, path: Path) -> set[str]:
    """Every module `path` imports, at the top or in a function, absolute or relative."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = dict(_modules())
IMPORTS = {module: imports_of(module, path) for module, path in MODULES.items()}


def package_of(module: str) -> str:
    """`app.overrides.service` → `app.overrides`; a module right under app/ is a package of its own."""
    return ".".join(module.split(".")[:2])


def test_the_import_reader_sees_function_bodies_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "app" / "core" / "example.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "def f():\n    from app.audit.refusals import record_refusal\n\nfrom . import db\nfrom .. import worker\n"
    )
    assert {"app.audit.refusals", "app.core.db", "app.worker"} <= imports_of("app.core.example", source)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if package_of(m) == "app.core"))
def test_core_imports_nothing_above_it(module: str) -> None:
    above = sorted(name for name in IMPORTS[module] if name.startswith("app.") and package_of(name) != "app.core")
    assert above == [], f"{module} imports {above}: create_app hands core what it needs instead"


def test_only_the_web_layer_knows_the_web_framework() -> None:
    """Routers, `create_app` and core's web plumbing may import FastAPI/Starlette; services take plain values."""

    def web_layer(module: str) -> bool:
        return module == "app.main" or module.endswith(".router") or package_of(module) == "app.core"

    knowing = {
        module: sorted(name for name in IMPORTS[module] if name.split(".")[0] in WEB_FRAMEWORK)
        for module in MODULES
        if not web_layer(module)
    }
    assert {module: names for module, names in knowing.items() if names} == {}


def test_packages_import_each_other_without_a_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for module, names in IMPORTS.items():
        own = package_of(module)
        graph.setdefault(own, set()).update(
            package_of(name) for name in names if name.startswith("app.") and package_of(name) != own
        )
    graph = {package: {other for other in others if other in graph} for package, others in graph.items()}
    done: set[str] = set()

    def visit(package: str, path: list[str]) -> None:
        if package in path:
            raise AssertionError(f"a cycle: {' -> '.join([*path[path.index(package) :], package])}")
        if package in done:
            return
        for other in sorted(graph[package]):
            visit(other, [*path, package])
        done.add(package)

    for package in sorted(graph):
        visit(package, [])


def test_the_product_imports_no_test_double() -> None:
    """The mailcow stand-in lives in devtools/ (dev mode finds it by name, from the checkout only)."""
    doubles = {
        module: sorted(name for name in names if name.split(".")[0] in ("devtools", "tests"))
        for module, names in IMPORTS.items()
    }
    assert {module: names for module, names in doubles.items() if names} == {}


# Who may write an override row with a bare `update(Override)`: the state machine (every state change), the
# worker's store (its bookkeeping: leases, attempts, the queue pass, the refreshed queue evidence), and the
# resume of a paused target (the API makes waiting jobs due, documented in app/worker/store.py).
OVERRIDE_WRITERS = {"app.overrides.lifecycle", "app.worker.store", "app.targets.service"}


def _writes_override(path: Path) -> bool:
    return any(
        isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "update"
        and any(isinstance(arg, ast.Name) and arg.id == "Override" for arg in node.args)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    )


def test_the_override_row_has_one_owner_for_worker_writes() -> None:
    """Issue 8: the worker's writes to an override go through app/worker/store.py, never a module's own update."""
    writers = {module for module, path in MODULES.items() if _writes_override(path)}
    assert writers - OVERRIDE_WRITERS == set()
    assert "app.worker.store" in writers  # the reader sees them
