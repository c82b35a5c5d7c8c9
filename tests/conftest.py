"""Session-wide cache of exported corpus models, shared by every test file."""

from __future__ import annotations

import os

# The Triton kernels are tested on CPU through Triton's interpreter, which is chosen when the
# kernels are decorated: set it before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib
from collections.abc import Callable

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Intentionally empty: markers and options are owned by pyproject.toml."""


@pytest.fixture(scope="session")
def exported_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str, str], pathlib.Path]:
    """Factory ``(arch_name, exporter) -> .onnx path``; each pair is exported once per session.

    Skips the calling test when the pair is unsupported; a failed export is cached and re-raised
    so later callers do not pay for it again.
    """
    # Imported here so test files that never export do not pay for importing torch.
    from architectures import ARCHITECTURES, export, unsupported_reason

    cache: dict[tuple[str, str], pathlib.Path | BaseException] = {}

    def get(arch_name: str, exporter: str) -> pathlib.Path:
        arch = ARCHITECTURES[arch_name]
        reason = unsupported_reason(arch, exporter)
        if reason is not None:
            pytest.skip(reason)
        key = (arch_name, exporter)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch_name}-{exporter}", numbered=True)
            try:
                cache[key] = export(arch, exporter, folder / f"{arch_name}.onnx")
            except Exception as exc:
                cache[key] = exc
        hit = cache[key]
        if isinstance(hit, BaseException):
            raise hit
        return hit

    return get


@pytest.fixture(scope="session")
def compressed_bert_tiny(tmp_path_factory: pytest.TempPathFactory):
    """``spa compile models/bert_tiny.onnx --nm 2:4 --export-compressed``, once per session:
    (the sparse model's path, the archive's path)."""
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("compressed")
    out, archive = folder / "out.onnx", folder / "w.npz"
    models = pathlib.Path(__file__).resolve().parents[1] / "models"
    done = subprocess.run(
        [sys.executable, "-m", "spa_compiler", "compile", str(models / "bert_tiny.onnx"),
         "--nm", "2:4", "-o", str(out), "--export-compressed", str(archive)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out, archive
