"""docs/faults.md keeps its promise: every row of the fault matrix has a test named after it, and every test the
page names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_AUTOMATED: set[int] = set()  # every row has its test (row 5, power loss, on the powerfs FUSE filesystem)


def test_every_row_has_a_test_and_every_named_test_exists():
    page = (ROOT / "docs" / "faults.md").read_text()
    rows = {int(n) for n in re.findall(r"^\| (\d+) \|", page, flags=re.M)}
    assert set(range(1, 41)) <= rows <= set(range(1, 47))  # rows 47+ join as their tests land
    defined = {(str(p.relative_to(ROOT)), m) for p in (ROOT / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", p.read_text(), flags=re.M)}
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", page))
    assert named and named <= defined, sorted(named - defined)
    covered = {int(n) for _, name in named for n in re.findall(r"row(\d+)", name)}
    assert covered | NOT_AUTOMATED == rows, sorted(rows - covered - NOT_AUTOMATED)
