"""Project-level promises: CI runs the README's command; `import engram` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if "pytest" in line and not line.startswith("#"))
    assert f"\n{command}\n" in (ROOT / "README.md").read_text()


def test_import_engram_is_light() -> None:
    code = "import sys, engram; print(sorted(m for m in ('torch', 'lmdb', 'avalanche') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
