"""N:M semi-structured sparsity: in every group of M consecutive weights along the reduction
axis, at most N are non-zero (2:4 is what sparse tensor cores, TensorRT and cuSPARSELt run).

Weights are handled as rows [R, K] with K the reduction axis (``rows_of`` / ``from_rows``):
a Conv weight [O, C, kh, kw] becomes [O·kh·kw, C], a MatMul B [K, N] becomes [N, K].

Two ways to choose the mask:

- ``magnitude_mask``: keep the N largest |w| of each group;
- ``obs_nm``: SparseGPT's column-by-column Optimal Brain Surgeon under the layer input's second
  moment H — each group's mask picks the N weights whose removal costs least (w² / [H⁻¹]ᵢᵢ),
  and every pruned weight's error is pushed onto the columns not yet visited, through the
  Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import numpy as np


def check_pattern(n: int, m: int) -> None:
    if m not in (4, 8, 16) or not 0 < n < m:
        raise ValueError(f"N:M sparsity needs M in 4, 8, 16 and 0 < N < M, not {n}:{m}")


def rows_of(values: np.ndarray, axis: int) -> np.ndarray:
    """The weight as [rows, K], K being ``axis`` (the reduction axis), in float64."""
    moved = np.moveaxis(np.asarray(values), axis, -1)
    return moved.reshape(-1, moved.shape[-1]).astype(np.float64)


def from_rows(rows: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``rows_of``, in ``like``'s dtype and layout."""
    moved_shape = np.moveaxis(np.asarray(like), axis, -1).shape
    restored = np.moveaxis(rows.reshape(moved_shape), -1, axis)
    return np.ascontiguousarray(restored, dtype=np.asarray(like).dtype)


def magnitude_mask(rows: np.ndarray, n: int, m: int) -> np.ndarray:
    """True where a weight stays: the N largest |w| of every M along K (ties: lower index)."""
    groups = np.abs(rows).reshape(rows.shape[0], -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows.shape)


def violations(rows: np.ndarray, n: int, m: int) -> int:
    """Groups of M along K with more than N non-zeros."""
    groups = (rows != 0).reshape(rows.shape[0], -1, m)
    return int((groups.sum(axis=-1) > n).sum())


def obs_nm(rows: np.ndarray, hessian: np.ndarray, n: int, m: int) -> np.ndarray:
    """SparseGPT with an N:M mask: the pruned, compensated rows. ``hessian``: the damped
    second moment of the K input features."""
    from scipy.linalg import cho_factor, cho_solve

    rows = np.array(rows, dtype=np.float64)
    features = rows.shape[1]
    # Upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U): row j of U, divided by its diagonal,
    # carries column j's error onto the columns after it.
    inverse = cho_solve(cho_factor(hessian, lower=True), np.eye(features))
    upper = np.linalg.cholesky(inverse).T
    for start in range(0, features, m):
        group = slice(start, start + m)
        diagonal = np.diag(upper)[group]
        saliency = np.square(rows[:, group]) / np.square(diagonal)
        order = np.argsort(saliency, axis=1, kind="stable")
        pruned = np.zeros((rows.shape[0], m), dtype=bool)
        np.put_along_axis(pruned, order[:, : m - n], True, axis=1)
        for offset in range(m):
            column = start + offset
            weights = rows[:, column]
            error = np.where(pruned[:, offset], weights, 0.0) / upper[column, column]
            rows[:, column:] -= np.outer(error, upper[column, column:])
            rows[pruned[:, offset], column] = 0.0
    return rows


def compress(rows: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept values [R, K·N/M] and, per group, their positions [R, K/M, N] (ascending)."""
    keep = rows != 0
    groups = keep.reshape(rows.shape[0], -1, m)
    if (groups.sum(axis=-1) > n).any():
        raise ValueError(f"the rows are not {n}:{m} sparse")
    # Groups with fewer than N non-zeros keep zeros at their lowest free positions.
    rank = np.where(groups, 0, 1) * m + np.arange(m)
    positions = np.sort(np.argsort(rank, axis=-1, kind="stable")[..., :n], axis=-1)
    values = np.take_along_axis(rows.reshape(rows.shape[0], -1, m), positions, axis=-1)
    return values.reshape(rows.shape[0], -1), positions.astype(np.uint8)


def decompress(values: np.ndarray, positions: np.ndarray, m: int) -> np.ndarray:
    rows, groups, n = positions.shape
    dense = np.zeros((rows, groups, m), dtype=values.dtype)
    np.put_along_axis(dense, positions.astype(np.int64), values.reshape(rows, groups, n), axis=-1)
    return dense.reshape(rows, groups * m)


# -- the compressed format (what --export-compressed writes and the Triton kernels read) ------
#
# For a weight made N:M sparse along its reduction axis, viewed as rows [R, K] (``rows_of``:
# the reduction axis last, every other axis flattened into R in the weight's own order):
#
#   values     [R, K·N/M], the weight's dtype: each group's kept values, in ascending position;
#   meta       [R, ceil(K/M · N · bits / 8)] uint8: each kept value's position inside its group
#              of M (0 … M−1), ``bits`` = 2 for M = 4 and 4 for M = 8, 16, packed from the low
#              bits of byte 0 upwards, row by row (a group with fewer than N non-zeros keeps
#              zeros at its lowest free positions; zeros beyond those come back as +0.0, so the
#              N:M pass writes pruned weights as +0.0, never -0.0).
#
# An .npz holds ``<weight>.values`` and ``<weight>.meta`` per weight, and ``format``: JSON with
# the version, the pattern and, per weight, its shape, axis, R, K, bits and dtype.

FORMAT_VERSION = 1


def index_bits(m: int) -> int:
    return 2 if m == 4 else 4


def pack_positions(positions: np.ndarray, m: int) -> np.ndarray:
    """[R, groups, N] positions -> [R, bytes] uint8, ``index_bits(m)`` bits each."""
    bits = index_bits(m)
    rows = positions.reshape(positions.shape[0], -1).astype(np.uint8)
    per_byte = 8 // bits
    padded = -(-rows.shape[1] // per_byte) * per_byte
    rows = np.pad(rows, ((0, 0), (0, padded - rows.shape[1])))
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    return (rows.reshape(rows.shape[0], -1, per_byte) << shifts).sum(axis=-1).astype(np.uint8)


def unpack_positions(meta: np.ndarray, m: int, groups: int, n: int) -> np.ndarray:
    bits = index_bits(m)
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    values = (meta[..., None] >> shifts) & ((1 << bits) - 1)
    flat = values.reshape(meta.shape[0], -1)[:, : groups * n]
    return flat.reshape(meta.shape[0], groups, n).astype(np.uint8)


def compressed_archive(proto, sparsity: dict) -> bytes:
    """The .npz bytes of every float weight the N:M pass made sparse, in the format above."""
    import io
    import json

    from onnx import numpy_helper

    n, m = (int(part) for part in sparsity["pattern"].split(":"))
    from spa_compiler.ir import held_weights

    weights = {t.name: t for t in proto.graph.initializer}
    held = held_weights(proto)
    arrays: dict[str, np.ndarray] = {}
    described = {}
    for entry in sparsity["applied"]:
        tensor = weights.get(entry["tensor"])
        if tensor is None or entry["method"].endswith("(quantized)"):
            continue
        values = held[tensor.name] if tensor.name in held else numpy_helper.to_array(tensor)
        moved = np.moveaxis(values, entry["axis"], -1)
        rows = moved.reshape(-1, moved.shape[-1])
        kept, positions = compress(rows, n, m)
        arrays[f"{tensor.name}.values"] = kept
        arrays[f"{tensor.name}.meta"] = pack_positions(positions, m)
        described[tensor.name] = {
            "shape": list(values.shape),
            "axis": entry["axis"],
            "rows": int(rows.shape[0]),
            "k": int(rows.shape[1]),
            "bits": index_bits(m),
            "dtype": str(values.dtype),
        }
    header = {"version": FORMAT_VERSION, "pattern": f"{n}:{m}", "tensors": described}
    arrays["format"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **dict(sorted(arrays.items())))
    return buffer.getvalue()


def _nonzero(target) -> np.ndarray:
    values = np.asarray(target.constant.values)
    if target.dequantize is not None:
        from spa_compiler.passes.sparsify_nm import _dequantized

        return _dequantized(target, values)[0] != 0
    return values != 0


def weight_violations_zeros(target) -> int:
    """Zero weights (dequantized, for a quantized one) of a ``sparsify_nm.Target``."""
    return int((~_nonzero(target)).sum())


def weight_violations(target, n: int, m: int) -> tuple[int, int]:
    """(groups, groups over N non-zeros) of a ``sparsify_nm.Target``'s weight."""
    rows = np.moveaxis(_nonzero(target), target.axis, -1)
    rows = rows.reshape(-1, rows.shape[-1])
    return rows.size // m, violations(rows, n, m)


__all__ = [
    "FORMAT_VERSION",
    "check_pattern",
    "compress",
    "compressed_archive",
    "decompress",
    "from_rows",
    "index_bits",
    "magnitude_mask",
    "obs_nm",
    "pack_positions",
    "rows_of",
    "unpack_positions",
    "violations",
    "weight_violations",
]
