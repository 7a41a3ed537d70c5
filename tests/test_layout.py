"""The package's shape holds: no module imports a later stage of the data path (acqd/*/__init__.py say why)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "acqd"
TOP = {"cli", "demo"}  # the entry points: they may import everything, nothing imports them
ROOT = "root"  # config, errors, session, __init__: shared by all stages
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


def imported(tree: ast.AST) -> set[str]:
    """Every acqd module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "acqd"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "acqd":
            out |= {f"{node.module}.{a.name}" if node.module == "acqd" else node.module for a in node.names}
    return out


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


def test_the_rule_sees_a_crossing():
    assert imported(ast.parse("def f():\n    from acqd.service.supervisor import Supervisor")) == {"acqd.service.supervisor"}
    assert layer("acqd.service.supervisor") not in ALLOWED["record"]
    assert layer("acqd.cli") not in ALLOWED["finalize"]
