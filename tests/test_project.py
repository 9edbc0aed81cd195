"""Project-level promises: CI runs the README's command; `import engram` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = next(line for line in ci if "pytest" in line and not line.startswith("#"))
    assert f"\n{command}\n" in (ROOT / "README.md").read_text()


def test_import_engram_is_light() -> None:
    code = "import sys, engram; print(sorted(m for m in ('torch', 'lmdb', 'avalanche') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# The index's project called "engram" is somebody else's (issue 26): every install line
# names this project's distribution, engram-cl, and its extras exist.
DISTRIBUTION = "engram-cl"


def test_every_install_line_names_the_distribution() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extras = set(project["optional-dependencies"])
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src").rglob("*.py"),
             *(ROOT / "src").rglob("*.yaml")]  # fmt: skip
    found = 0
    for path in files:
        for name, extra in re.findall(r"pip install '([\w.-]+)\[(\w+)\]'", path.read_text()):
            assert (name, extra in extras) == (DISTRIBUTION, True), f"{path}: {name}[{extra}]"
            found += 1
        assert not re.search(r"pip install engram(?![-\w])", path.read_text()), path
    assert found >= 10
