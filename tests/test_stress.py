"""``scripts/stress --quick``: every stress check runs, finds nothing, and cleans up.

The quick run is one exerciser seed in tmpfs mode, two in overlay mode (a large,
mapped lower file and a small, copied one), then the load and fill checks in
each mode, and the checkpoint check in each mode: nine summary lines, each ending in ``corruptions=0`` (a check that
failed otherwise appends `` FAILED: ...``).  Afterwards none of its mounts or
temporary directories may be left behind.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from conftest import ROOT

EXPECTED_CHECKS = [
    "exerciser tmpfs",
    "exerciser overlay",
    "exerciser overlay",
    "load tmpfs",
    "load overlay",
    "fill tmpfs",
    "fill overlay",
    "checkpoint tmpfs",
    "checkpoint overlay",
]


def stress_leftovers() -> list[str]:
    """Mounts and temporary directories that scripts/stress would have made."""
    with open("/proc/self/mounts") as mounts:
        mounted = [line.split()[1] for line in mounts if "mmfs-stress-" in line.split()[1]]
    return mounted + [str(path) for path in Path(tempfile.gettempdir()).glob("mmfs-stress-*")]


def test_stress_quick_finds_no_corruption() -> None:
    before = set(stress_leftovers())
    done = subprocess.run(
        [str(ROOT / "scripts" / "stress"), "--quick"], capture_output=True, text=True, timeout=900
    )
    output = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, output
    lines = done.stdout.splitlines()
    assert [" ".join(line.split()[:2]) for line in lines] == EXPECTED_CHECKS, output
    for line in lines:
        assert line.endswith(" corruptions=0"), output
    assert set(stress_leftovers()) <= before, output
