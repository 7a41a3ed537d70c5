"""The package's shape holds: no module imports a later stage of the data path (acqd/*/__init__.py say why), the
service's protocols sit on the daemon and never under it, config and metadata stand alone at the root, and no
module imports another that imports it back."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "acqd"
TOP = {"cli", "demo"}  # the entry points: they may import everything, nothing imports them
ROOT = "root"  # config/, metadata/, errors, files, h5lock, session, client, __init__: shared by all stages
ALLOWED = {
    ROOT: {ROOT},
    "wire": {ROOT, "wire"},
    "record": {ROOT, "wire", "record"},
    "sim": {ROOT, "wire", "sim"},
    "finalize": {ROOT, "wire", "record", "finalize"},
    "share": {ROOT, "wire", "record", "finalize", "share"},
    "service": {ROOT, "wire", "record", "finalize", "share", "sim", "service"},
}


def layer(module: str) -> str:
    """'acqd.record.writer' -> 'record'; 'acqd.config' -> 'root'; 'acqd.cli' -> 'cli'."""
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    return parts[1] if parts[1] in ALLOWED or parts[1] in TOP else ROOT


ROOT_PACKAGES = {
    "acqd.metadata": {"acqd.errors", "acqd.files", "acqd.metadata"},  # below the config: never imports it
    "acqd.config": {"acqd.errors", "acqd.files", "acqd.metadata", "acqd.config"},
}
"""What the root's packages may import: nothing above the root, and metadata not even the config."""
HTTP = "acqd.service.http"
PROCESS_MAIN = "acqd.service.daemon"  # joins the daemon and its protocols: the one service module above http


def module_name(path: Path) -> str:
    """acqd/service/http/app.py -> 'acqd.service.http.app'; acqd/config/__init__.py -> 'acqd.config'."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(tree: ast.AST) -> set[str]:
    """Every acqd module a file imports, at any depth (function-level and TYPE_CHECKING imports included);
    ``from acqd.service import live`` names the module ``acqd.service.live``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "acqd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "acqd":
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES or node.module == "acqd"
                    else node.module for a in node.names}
    return out


def imports() -> dict[str, set[str]]:
    """acqd module -> the acqd modules it imports."""
    return {name: imported(ast.parse(path.read_text(), str(path))) for name, path in MODULES.items()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_module_imports_across_the_stage_lines():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own in TOP:
            continue
        for target in imported(ast.parse(path.read_text(), str(path))):
            if (to := layer(target)) not in ALLOWED[own]:
                crossings.append(f"{path.relative_to(PACKAGE.parent)} ({own}) imports {target} ({to})")
    assert crossings == []


def test_http_imports_the_daemon_never_the_reverse():
    reverse = [f"{m} imports {t}" for m, targets in imports().items() for t in targets
               if within(m, "acqd.service") and not within(m, HTTP) and m != PROCESS_MAIN and within(t, HTTP)]
    assert reverse == []


def test_config_and_metadata_import_nothing_above_the_root():
    above = [f"{m} imports {t}" for m, targets in imports().items() for package, allowed in ROOT_PACKAGES.items()
             if within(m, package) for t in targets if not any(within(t, a) for a in allowed)]
    assert above == []


def test_no_modules_import_each_other():
    """Directly (a <-> b) or round a longer loop: each module can be read, and imported, after what it imports."""
    try:
        graphlib.TopologicalSorter(imports()).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_cycle_rule_sees_a_cycle():
    graph = {"acqd.a": {"acqd.b"}, "acqd.b": {"acqd.c"}, "acqd.c": {"acqd.a"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()
    assert imported(ast.parse("from acqd.service import live")) == {"acqd.service.live"}
    assert imported(ast.parse("from acqd.config import RigConfig")) == {"acqd.config"}


def test_the_rule_sees_a_crossing():
    assert imported(ast.parse("def f():\n    from acqd.service.supervisor import Supervisor")) == {"acqd.service.supervisor"}
    assert layer("acqd.service.supervisor") not in ALLOWED["record"]
    assert layer("acqd.cli") not in ALLOWED["finalize"]
