"""What `pip install .` (not editable) gets: every file the package reads at run time must be in the
wheel, or `model.name_or_path=tiny` and `datasets=[demo]` fail on an installed copy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _source_files() -> list[str]:
    """The tree as a clean clone of this working copy has it: tracked and new files, not ignored ones
    (an editable install's dpo_ds.egg-info/SOURCES.txt would otherwise feed setuptools the file list)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


def test_wheel_holds_every_shipped_file(tmp_path):
    src = tmp_path / "src"
    files = _source_files()
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    wheel_cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run(
        [*wheel_cmd, "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("dpo_ds-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [f for f in files if f.startswith("dpo_ds/")]
    assert any(f.endswith("tiny/config.json") for f in shipped)  # the test looks at the real tree
    missing = [f for f in shipped if f not in names]
    assert not missing, f"in the repository but not in the wheel: {missing}"
