"""The N:M compressed weight format in torch, and the operands the Triton kernels read.

The format is defined once, in ``spa_compiler.nm`` (``compress`` / ``pack_positions``: values
[R, K·N/M] in ascending position per group, 2-bit (M = 4) or 4-bit (M = 8, 16) positions packed
from the low bits of byte 0 upwards, row by row). This module builds exactly those bytes from
torch tensors (``compress`` / ``pack_positions`` / ``unpack_positions``, tested byte for byte
against the numpy ones) and turns them into an ``NMWeight``: the same values, and the metadata
bytes of each row padded to a multiple of 4 and viewed as little-endian int32 words, so that a
kernel loads 16 (2-bit) or 8 (4-bit) positions with one 32-bit load. Rows are output features:
the kernels compute ``y = x · Wᵀ`` with W [R, K] — an ONNX MatMul's B [K, N] is W = Bᵀ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from spa_compiler.nm import FORMAT_VERSION, check_pattern, index_bits


def magnitude_prune(dense: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``dense`` [R, K] with all but the N largest |w| of every M along K set to zero."""
    check_pattern(n, m)
    rows, k = dense.shape
    if k % m:
        raise ValueError(f"K = {k} is not a multiple of M = {m}")
    groups = dense.reshape(rows, k // m, m)
    order = groups.abs().argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return torch.where(keep, groups, torch.zeros((), dtype=dense.dtype)).reshape(rows, k)


def compress(dense: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept values [R, K·N/M] and their positions [R, K/M, N] (ascending), as
    ``spa_compiler.nm.compress``: a group with fewer than N non-zeros keeps zeros at its lowest
    free positions."""
    rows, k = dense.shape
    if k % m:
        raise ValueError(f"K = {k} is not a multiple of M = {m}")
    groups = dense.reshape(rows, k // m, m)
    nonzero = groups != 0
    if (nonzero.sum(dim=-1) > n).any():
        raise ValueError(f"the rows are not {n}:{m} sparse")
    rank = torch.where(nonzero, 0, 1) * m + torch.arange(m, device=dense.device)
    positions = rank.argsort(dim=-1, stable=True)[..., :n].sort(dim=-1).values
    values = groups.gather(-1, positions)
    return values.reshape(rows, -1), positions.to(torch.uint8)


def pack_positions(positions: torch.Tensor, m: int) -> torch.Tensor:
    """[R, groups, N] positions -> [R, bytes] uint8 (``spa_compiler.nm.pack_positions``)."""
    bits = index_bits(m)
    per_byte = 8 // bits
    flat = positions.reshape(positions.shape[0], -1).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, (-flat.shape[1]) % per_byte))
    shifts = torch.arange(per_byte, device=flat.device, dtype=torch.int32) * bits
    packed = (flat.reshape(flat.shape[0], -1, per_byte) << shifts).sum(dim=-1)
    return packed.to(torch.uint8)


def unpack_positions(meta: torch.Tensor, m: int, groups: int, n: int) -> torch.Tensor:
    bits = index_bits(m)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=meta.device, dtype=torch.int32) * bits
    fields = (meta.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    flat = fields.reshape(meta.shape[0], -1)[:, : groups * n]
    return flat.reshape(meta.shape[0], groups, n).to(torch.uint8)


def decompress(values: torch.Tensor, positions: torch.Tensor, m: int) -> torch.Tensor:
    rows, groups, n = positions.shape
    dense = torch.zeros((rows, groups, m), dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions.to(torch.int64), values.reshape(rows, groups, n))
    return dense.reshape(rows, groups * m)


def meta_words(meta: torch.Tensor) -> torch.Tensor:
    """Metadata bytes [R, B] -> int32 words [R, ceil(B/4)] (rows zero-padded; little-endian,
    so byte 0 is a word's low byte and position t of a word sits at bits t·bits)."""
    meta = meta.to(torch.uint8)
    padded = torch.nn.functional.pad(meta, (0, (-meta.shape[1]) % 4)).contiguous()
    if padded.shape[1] == 0:
        return torch.zeros((meta.shape[0], 0), dtype=torch.int32, device=meta.device)
    # view() reinterprets the bytes in the machine's order; every CUDA/x86 host is little-endian.
    return padded.view(torch.int32)


@dataclass(frozen=True)
class NMWeight:
    """A weight [R, K] made N:M sparse along K, in the form the kernels read."""

    values: torch.Tensor  # [R, K·N/M], fp16/bf16/fp32, contiguous
    words: torch.Tensor  # [R, W] int32: packed positions, W = ceil(ceil(K·N/M·bits/8) / 4)
    n: int
    m: int
    k: int

    def __post_init__(self) -> None:
        check_pattern(self.n, self.m)
        if self.n & (self.n - 1):
            raise ValueError(f"the kernels need N a power of two, not {self.n}:{self.m}")
        kept = self.k * self.n // self.m
        if self.k % self.m or tuple(self.values.shape) != (self.values.shape[0], kept):
            raise ValueError(
                f"values {tuple(self.values.shape)} do not hold K = {self.k} at {self.n}:{self.m}"
            )
        if self.words.dtype != torch.int32 or self.words.shape[0] != self.values.shape[0]:
            raise ValueError("words must be int32 with one row per values row")
        needed = -(-kept * self.bits // 32)
        if self.words.dim() != 2 or self.words.shape[1] < needed:
            raise ValueError(f"words must be [R, ≥ {needed}] for K = {self.k} at {self.n}:{self.m}")
        # The kernels index rows by their stride and walk each row with unit steps.
        if (kept and self.values.stride(1) != 1) or (needed and self.words.stride(1) != 1):
            raise ValueError("values and words rows must be contiguous")
        if self.values.numel() and self.k:
            positions = self.positions()
            # The kernels rely on the format's ascending positions (slot j of a group can only
            # hold kept value i with i ≤ j ≤ i + M − N): a third-party archive must keep it.
            ascending = bool((positions[..., 1:] > positions[..., :-1]).all())
            if not ascending or int(positions.max()) >= self.m:
                raise ValueError(
                    f"positions must ascend strictly inside each group of {self.m} and be below "
                    f"{self.m} (the compressed format of spa_compiler.nm)"
                )

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def bits(self) -> int:
        return index_bits(self.m)

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads: values plus metadata (the int32 row padding included)."""
        return self.values.numel() * self.values.element_size() + self.words.numel() * 4

    @classmethod
    def from_dense(cls, dense: torch.Tensor, n: int, m: int, prune: bool = False) -> NMWeight:
        """From an N:M-sparse [R, K] weight (``prune=True``: keep the N largest of every M)."""
        check_pattern(n, m)
        if prune:
            dense = magnitude_prune(dense, n, m)
        values, positions = compress(dense, n, m)
        words = meta_words(pack_positions(positions, m))
        return cls(values.contiguous(), words, n, m, int(dense.shape[1]))

    @classmethod
    def from_compressed(
        cls, values, meta, n: int, m: int, k: int, device: str | torch.device | None = None
    ) -> NMWeight:
        """From ``spa compile --export-compressed`` arrays (numpy or torch). A bfloat16 model's
        values come back from ``np.load`` as 2-byte void (``V2``: NumPy has no bfloat16, and an
        ml_dtypes array does not survive ``np.savez``); they are read as bfloat16."""
        if not torch.is_tensor(values):
            values = np.asarray(values)
            void16 = values.dtype.kind == "V" and values.dtype.itemsize == 2
            if void16 or values.dtype.name == "bfloat16":
                values = torch.from_numpy(values.view(np.uint16).copy()).view(torch.bfloat16)
        values = torch.as_tensor(values)
        meta = torch.as_tensor(np.asarray(meta) if not torch.is_tensor(meta) else meta)
        if meta.dtype != torch.uint8 or meta.dim() != 2:
            # meta_words' cast would wrap any other integer silently
            raise ValueError(f"meta must be [R, bytes] uint8, not {list(meta.shape)} {meta.dtype}")
        words = meta_words(meta)
        return cls(values.contiguous().to(device), words.to(device), n, m, k)

    def positions(self) -> torch.Tensor:
        meta = self.words.contiguous().view(torch.uint8)
        if meta.shape[1] == 0:
            shape = (meta.shape[0], self.k // self.m, self.n)
            return torch.zeros(shape, dtype=torch.uint8, device=meta.device)
        return unpack_positions(meta, self.m, self.k // self.m, self.n)

    def to_dense(self) -> torch.Tensor:
        return decompress(self.values, self.positions(), self.m)


__all__ = [
    "NMWeight",
    "compress",
    "decompress",
    "magnitude_prune",
    "meta_words",
    "pack_positions",
    "unpack_positions",
]


def load_archive(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> dict[str, NMWeight]:
    """Every weight of a ``spa compile --nm N:M --export-compressed`` archive, by the name of
    its initializer in the compiled model, as the [R, K] rows the kernels read: a Gemm or
    MatMul weight's rows are its output features (``y = x · Wᵀ``), a Conv weight's
    [O·kh·kw, C] (only a 1×1 Conv is one matmul). ValueError for a file that is not such an
    archive."""
    import json
    import zipfile

    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path}: not an N:M archive ({error})") from None
    try:
        header = json.loads(bytes(arrays["format"]).decode())
        version, pattern, tensors = header["version"], header["pattern"], header["tensors"]
        n, m = (int(part) for part in pattern.split(":"))
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: no readable 'format' entry ({error!r})") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, this spa reads {FORMAT_VERSION}")
    weights = {}
    for name, info in sorted(tensors.items()):
        if f"{name}.values" not in arrays or f"{name}.meta" not in arrays:
            raise ValueError(f"{path}: '{name}' is described but its arrays are missing")
        try:
            weights[name] = NMWeight.from_compressed(
                arrays[f"{name}.values"], arrays[f"{name}.meta"], n, m, int(info["k"]), device
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: '{name}': {error}") from None
        if weights[name].rows != int(info["rows"]):
            raise ValueError(f"{path}: '{name}' has {weights[name].rows} rows, not {info['rows']}")
    return weights
