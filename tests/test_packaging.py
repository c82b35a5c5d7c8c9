"""The built wheel installs passes/ and kernels/ as spa_compiler.passes and
spa_compiler.kernels, and puts nothing else at the top of site-packages."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("spa_compiler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"spa_compiler"}
    assert "spa_compiler/passes/__init__.py" in names
    assert "spa_compiler/passes/analyze_channels.py" in names
    assert "spa_compiler/kernels/__init__.py" in names
    assert "spa_compiler/frameworks/torch.py" in names
    assert not any(n.startswith(("passes/", "kernels/", "tests/", "models/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "spa = spa_compiler.cli:entry" in text


def test_installed_names_resolve():
    import spa_compiler.kernels
    import spa_compiler.passes

    assert pathlib.Path(spa_compiler.passes.__file__).parent.name == "passes"
    assert hasattr(spa_compiler.passes, "AnalyzeChannels")
    assert spa_compiler.kernels.__name__ == "spa_compiler.kernels"
