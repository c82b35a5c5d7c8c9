"""Optimal Brain Surgeon for structured pruning, layer by layer.

A consumer layer computes y = W x (rows of ``W`` are outputs, columns input features). With
the input second moment H = E[x xᵀ], removing the input features S and refitting the rest in
least squares costs

    error(S) = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ)

and the refit is W_R ← W_R + W_S T with T = H_SR H_RR⁻¹ (the regression of the removed
features on the kept ones). A bias is a kept feature that is always 1: H is augmented with the
features' means, and T's last column is what the removed features' mean contribution adds to
the bias (FLAP's mean compensation falls out of the same least squares).

Convolutions are treated per kernel position: every (output channel, kernel position) pair is
one row, and all rows share the channel-level H (positions assumed uncorrelated), so a 3×3 conv
costs no more than a linear layer with 9× the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMPING = 0.01  # fraction of H's mean diagonal added to it (SparseGPT's percdamp)
# Wider activations keep H block-diagonal in blocks of this many features (cross-block
# correlations dropped): accumulating and inverting then cost n·BLOCK and n·BLOCK² instead of
# n² and n³ (an 11008-wide LLaMA MLP: 11 GB·s of BLAS work becomes 4).
BLOCK = 4096


@dataclass
class Moments:
    """Second moment and mean of one activation's features, accumulated over samples.

    Up to ``BLOCK`` features H is dense. Wider activations keep the second moments of
    diagonal blocks only, and H = blockdiag(Cov_b) + μμᵀ: cross-block covariances are
    dropped, the means' outer product is not (dropping it would leave H indefinite once a
    bias border is added)."""

    # Σ x xᵀ [n, n], symmetric once ``settle`` ran. Sampled moments accumulate in float32 (a
    # BLAS ssyrk into the upper triangle, which ``settle`` mirrors): products were float32
    # anyway, and a float64 copy would double the largest buffer of a compile (an 11008-wide
    # MLP input: 484 MB instead of 968).
    sum_outer: np.ndarray
    sum: np.ndarray  # Σ x, float64 [n]
    count: int
    stale_lower: bool = False  # samples added since the last mirror
    skipped: int = 0  # samples dropped for holding inf or NaN

    @classmethod
    def empty(cls, features: int) -> Moments:
        square = np.zeros((features, features), dtype=np.float32, order="F")
        return cls(square, np.zeros(features), 0)

    def add(self, samples: np.ndarray) -> None:
        """``samples``: [rows, features]; rows with inf or NaN are dropped (counted)."""
        # Products in float32 by a symmetric rank-k update into one Fortran-ordered buffer
        # (BLAS ssyrk: a quarter of a float64 gemm's time, no temporaries); folded into the
        # float64 sum once, when H is asked for.
        from scipy.linalg import blas

        with np.errstate(over="ignore", invalid="ignore"):
            rows = np.asarray(samples, dtype=np.float32)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            self.skipped += int((~finite).sum())
            rows = rows[finite]
        if rows.shape[0] == 0:
            return
        rows = np.asfortranarray(rows)
        n = rows.shape[1]
        if self.sum_outer.dtype != np.float32 or not self.sum_outer.flags.f_contiguous:
            self.settle()
            self.sum_outer = np.asfortranarray(self.sum_outer, dtype=np.float32)
        for start in range(0, n, BLOCK):
            block = slice(start, min(n, start + BLOCK))
            self.sum_outer[block, block] = blas.ssyrk(
                1.0,
                rows[:, block],
                beta=1.0,
                c=self.sum_outer[block, block],
                trans=1,
                lower=0,
                overwrite_c=1,
            )
        self.stale_lower = True
        self.sum += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    def settle(self) -> None:
        """Mirror the upper triangle the samples updated onto the lower, in place."""
        if not self.stale_lower:
            return
        square, n, step = self.sum_outer, self.sum_outer.shape[0], 1024
        for start in range(0, n, step):
            stop = min(n, start + step)
            square[start:stop, :start] = square[:start, start:stop].T
            block = square[start:stop, start:stop]
            block[...] = np.triu(block) + np.triu(block, 1).T
        self.stale_lower = False

    @property
    def features(self) -> int:
        return int(self.sum.shape[0])

    @property
    def usable(self) -> bool:
        """Samples were seen and every sum is finite (float32 products can overflow)."""
        self.settle()
        return (
            self.count > 0 and bool(np.isfinite(self.sum).all())
            and bool(np.isfinite(self.sum_outer).all())
        )  # fmt: skip

    def _covariance_blocks(self, damping: float) -> tuple[list[np.ndarray], np.ndarray, float]:
        """Damped covariance of each diagonal block, the mean, and the damping added."""
        self.settle()
        count = max(self.count, 1)
        mean = self.sum / count
        n = self.features
        blocks = []
        for start in range(0, n, BLOCK):
            block = slice(start, min(n, start + BLOCK))
            second_block = self.sum_outer[block, block].astype(np.float64) / count
            blocks.append(second_block - np.outer(mean[block], mean[block]))
        second_diagonal = np.concatenate([np.diag(c) for c in blocks]) + np.square(mean)
        scale = float(second_diagonal.mean()) if n and second_diagonal.mean() > 0 else 1.0
        for covariance in blocks:
            np.einsum("ii->i", covariance)[:] += damping * scale
        return blocks, mean, damping * scale

    def hessian(self, with_bias: bool, damping: float = DAMPING) -> np.ndarray:
        """E[x xᵀ] (augmented with the means and a constant 1 when ``with_bias``), damped on
        the features only: damping the constant coordinate would pull the intercept (the
        mean compensation) towards zero; E[x xᵀ] ⪰ E[x] E[x]ᵀ keeps it positive definite."""
        n = self.features
        size = n + 1 if with_bias else n
        second = np.empty((size, size))
        if n <= BLOCK:
            self.settle()
            count = max(self.count, 1)
            np.divide(self.sum_outer, count, out=second[:n, :n], dtype=np.float64)
            mean = self.sum / count
            diagonal = np.einsum("ii->i", second)[:n]  # a writable view
            scale = float(diagonal.mean()) if n and diagonal.mean() > 0 else 1.0
            diagonal += damping * scale
        else:
            blocks, mean, _ = self._covariance_blocks(damping)
            np.multiply.outer(mean, mean, out=second[:n, :n])
            for start, covariance in zip(range(0, n, BLOCK), blocks, strict=True):
                block = slice(start, start + covariance.shape[0])
                second[block, block] += covariance
        if with_bias:
            second[:n, n] = second[n, :n] = mean
            second[n, n] = 1.0
        return second

    def inverse(self, with_bias: bool, damping: float = DAMPING) -> np.ndarray:
        """H⁻¹ of ``hessian``: by Cholesky up to ``BLOCK`` features; past it from the
        blocks' inverses C⁻¹ and the mean (Sherman-Morrison, or the bordered form
        [[C⁻¹, −C⁻¹μ], [−μᵀC⁻¹, 1 + μᵀC⁻¹μ]] with a bias)."""
        n = self.features
        if n <= BLOCK:
            return inverse_hessian(self.hessian(with_bias, damping))
        blocks, mean, _ = self._covariance_blocks(damping)
        size = n + 1 if with_bias else n
        inverse = np.zeros((size, size))
        for start, covariance in zip(range(0, n, BLOCK), blocks, strict=True):
            block = slice(start, start + covariance.shape[0])
            inverse[block, block] = inverse_hessian(covariance)
        projected = inverse[:n, :n] @ mean
        if with_bias:
            inverse[:n, n] = inverse[n, :n] = -projected
            inverse[n, n] = 1.0 + float(mean @ projected)
        else:
            inverse[:n, :n] -= np.outer(projected, projected) / (1.0 + float(mean @ projected))
        return inverse


def block_errors(rows: np.ndarray, inverse: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """OBS error of removing each block of features alone.

    ``rows`` [R, n], ``inverse`` = H⁻¹ [n, n], ``blocks`` [channels, per_channel] indices."""
    weights = rows[:, blocks]  # [R, C, g]
    if blocks.shape[1] == 1:
        diagonal = inverse[blocks[:, 0], blocks[:, 0]]
        return np.einsum("rc,rc->c", weights[:, :, 0], weights[:, :, 0]) / diagonal
    sub = inverse[blocks[:, :, None], blocks[:, None, :]]  # [C, g, g]
    solved = np.linalg.solve(sub, np.transpose(weights, (1, 2, 0)))  # [C, g, R]
    return np.einsum("rcg,cgr->c", weights, solved)


def remove_features(
    rows: np.ndarray, inverse: np.ndarray, features: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Remove ``features`` at once: compensated rows, H⁻¹ of the kept features (the removed
    ones' rows and columns become zero) and the error it costs."""
    sub = inverse[np.ix_(features, features)]
    picked = inverse[features, :]
    coefficients = np.linalg.solve(sub, picked)  # [(H⁻¹)_SS]⁻¹ (H⁻¹)_S:
    removed = rows[:, features]
    error = float(np.einsum("rs,rs->", removed, removed @ np.linalg.inv(sub).T))
    rows = rows - removed @ coefficients
    inverse = inverse - inverse[:, features] @ coefficients
    rows[:, features] = 0.0
    inverse[features, :] = 0.0
    inverse[:, features] = 0.0
    return rows, inverse, error


@dataclass
class Layer:
    """One consumer of a group for scoring: its rows, H⁻¹ and the feature indices each
    channel of the group owns in it."""

    rows: np.ndarray  # [R, n(+1)]
    inverse: np.ndarray  # H⁻¹ [n(+1), n(+1)]
    blocks: np.ndarray  # [channels, per_channel]
    energy: float  # E‖W x‖², to make errors relative


def removal_scores(
    layers: list[Layer], channels: int, steps: int = 32, depth: float = 1.0
) -> np.ndarray:
    """Greedy OBS removal of the group's channels, a chunk at a time, every consumer
    compensated after each chunk; a channel's score is the relative output error reached
    when it goes (the last channel left scores highest). Higher = more important.

    Removing the lowest-scoring k channels is the greedy choice for every k, so one order
    serves every ratio. Each consumer's rows and H⁻¹ shrink to the features still present,
    so later chunks cost less. ``depth`` < 1 stops once that fraction of the channels is
    ordered (a compile at one ratio needs no more); the rest score above, by their errors
    at that point."""
    states = [_Shrinking(lay) for lay in layers]
    energy = sum(lay.energy for lay in layers) or 1.0
    scores = np.zeros(channels)
    remaining = np.arange(channels)
    chunk = max(1, -(-channels // steps))
    cumulative = 0.0
    wanted = min(channels - 1, int(np.ceil(depth * channels)))
    while remaining.size > 1:
        errors = np.zeros(remaining.size)
        for state in states:
            errors += block_errors(state.rows, state.inverse, state.blocks(remaining))
        if channels - remaining.size >= wanted:
            scores[remaining] = (cumulative + np.maximum(errors, 0.0)) / energy + 1e-12
            return scores
        order = np.lexsort((remaining, errors))
        taken = order[: min(chunk, remaining.size - 1)]
        step_error = sum(max(state.remove(remaining[taken]), 0.0) for state in states)
        for rank, position in enumerate(taken):
            share = (rank + 1) / taken.size
            scores[remaining[position]] = (cumulative + share * step_error) / energy
        cumulative += step_error
        remaining = np.delete(remaining, taken)
    scores[remaining] = (cumulative / energy) + 1.0  # the last channel always stays
    return scores


class _Shrinking:
    """A consumer's rows and H⁻¹ restricted to the features not removed yet."""

    def __init__(self, layer: Layer) -> None:
        self.rows, self.inverse, self.channel_blocks = layer.rows, layer.inverse, layer.blocks
        self.position = np.arange(layer.inverse.shape[0])  # original feature -> column

    def blocks(self, channels: np.ndarray) -> np.ndarray:
        return self.position[self.channel_blocks[channels]]

    def remove(self, channels: np.ndarray) -> float:
        removed = self.blocks(channels).reshape(-1)
        kept = np.setdiff1d(np.arange(self.inverse.shape[0]), removed)
        sub = self.inverse[np.ix_(removed, removed)]
        coefficients = np.linalg.solve(sub, self.inverse[np.ix_(removed, kept)])
        weights = self.rows[:, removed]
        error = float(np.einsum("rs,rs->", weights, np.linalg.solve(sub, weights.T).T))
        self.rows = self.rows[:, kept] - weights @ coefficients
        self.inverse = (
            self.inverse[np.ix_(kept, kept)] - self.inverse[np.ix_(kept, removed)] @ coefficients
        )
        mapping = np.full(self.position.shape[0], -1)
        alive = self.position >= 0
        old = self.position[alive]
        new_index = np.full(sub.shape[0] + kept.size, -1)
        new_index[kept] = np.arange(kept.size)
        mapping[alive] = new_index[old]
        self.position = mapping
        return error


def refit(rows: np.ndarray, hessian: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Least-squares refit after removing the features ``removed``: the change to add to
    ``rows`` (zero on the removed columns' complement when their weights are zero)."""
    features = hessian.shape[0]
    kept = np.setdiff1d(np.arange(features), removed)
    delta = np.zeros_like(rows)
    if removed.size == 0 or kept.size == 0:
        return delta
    # T = H_SR H_RR⁻¹, solved as H_RR Tᵀ = H_RS (H is symmetric).
    coefficients = np.linalg.solve(hessian[np.ix_(kept, kept)], hessian[np.ix_(kept, removed)]).T
    delta[:, kept] = rows[:, removed] @ coefficients
    return delta


def inverse_hessian(hessian: np.ndarray) -> np.ndarray:
    """H⁻¹ from a Cholesky factor (H is damped, so positive definite): LAPACK potrf + potri,
    half the work of a general inverse."""
    from scipy.linalg import lapack

    factor, info = lapack.dpotrf(hessian, lower=1)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=1)
    if info != 0:  # not positive definite after all (degenerate moments): least squares
        return np.linalg.pinv(hessian, hermitian=True)
    # potri fills the lower triangle; the upper one is still the cleaned factor's zeros.
    diagonal = np.diag(inverse).copy()
    inverse += inverse.T
    np.einsum("ii->i", inverse)[:] = diagonal
    return inverse


__all__ = [
    "DAMPING",
    "Layer",
    "Moments",
    "block_errors",
    "inverse_hessian",
    "refit",
    "removal_scores",
    "remove_features",
]
