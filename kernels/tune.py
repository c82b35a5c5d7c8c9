"""Search for the sparse kernel's best blocks at one shape, on the GPU, by coordinate descent.

The autotuner only chooses among the configurations listed in ``nm_matmul``; this search walks
away from a start (the autotuner's choice) one block size at a time — BLOCK_N, BLOCK_K,
BLOCK_M, warps, pipeline stages, split-K, product path — keeps a step when it is faster, and
stops at a configuration no neighbour beats or when its time is up. One GPU session can so
find what the configuration lists should hold. The neighbourhood and the walk are plain Python
(tested on CPU); ``benchmark.sweep`` times each configuration with CUDA graphs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from spa_compiler.kernels.nm_matmul import MODES, SPLIT_K_UP_TO_M, _full, _tile_words

# fp32 accumulator elements one program may hold: beyond ~16384 (128 registers a thread at
# 4 warps) a tile spills.
MAX_ACCUMULATOR = 16384
# Weight elements (dense positions) one program's K-step covers: 64 KB of fp16 a stage. Larger
# tiles only add registers, shared memory and compile time at these shapes.
MAX_TILE = 32768
LIMITS = {
    "BLOCK_M": (1, 256),
    "BLOCK_N": (8, 256),
    "BLOCK_K": (32, 2048),
    "warps": (1, 8),
    "stages": (1, 6),
    "SPLIT_K": (1, 16),
}
INDEX = {"BLOCK_M": 0, "BLOCK_N": 1, "BLOCK_K": 2, "MODE": 3, "warps": 4, "stages": 5,
         "SPLIT_K": 6}  # fmt: skip


def accumulator_size(config: tuple, group: int) -> int:
    block_m, block_n, block_k, mode, *_ = config
    if mode == "dot":
        return block_m * block_n
    if mode == "fma":
        return block_m * block_n * block_k
    return block_m * block_n * block_k // group


def valid(config: tuple, m: int, n: int, k: int, pattern: tuple[int, int], bits: int) -> bool:
    """A configuration the sparse kernel accepts and that cannot be hopeless at this shape."""
    block_m, block_n, block_k, mode, _, _, split = config
    keep, group = pattern
    if mode not in MODES or _tile_words(block_k, keep, group, bits) is None:
        return False
    if mode == "gather" and pattern not in ((2, 4), (4, 8)):
        return False
    if mode == "dot" and min(block_m, block_n, block_k) < 16:
        return False
    for name, (low, high) in LIMITS.items():
        if not low <= config[INDEX[name]] <= high:
            return False
    if block_m > max(16, 2 * m) or block_n > max(16, n) or block_k > max(64, k):
        return False
    if split > 1 and (m > SPLIT_K_UP_TO_M or split * block_k > k):
        return False
    if block_n * block_k > MAX_TILE:
        return False
    return accumulator_size(config, group) <= MAX_ACCUMULATOR


def into_region(config: tuple, m: int, n: int, k: int, pattern: tuple[int, int],
                bits: int) -> tuple:  # fmt: skip
    """``config``, or — where ``valid`` refuses it (tiles wider than a small K or N, split-K
    past the rows) — the nearest configuration it accepts by halving blocks and splits, so
    that a walk from it can move."""
    config = _full(config)
    for _ in range(32):
        if valid(config, m, n, k, pattern, bits):
            return config
        block_m, block_n, block_k, mode, warps, stages, split = config
        if split > 1 and (m > SPLIT_K_UP_TO_M or split * block_k > k):
            split //= 2
        elif block_k > max(64, k) or block_n * block_k > MAX_TILE:
            block_k //= 2
        elif block_n > max(16, n):
            block_n //= 2
        elif block_m > max(16, 2 * m):
            block_m //= 2
        else:
            return config  # refused for another reason: the walk's neighbours may still move
        config = (block_m, block_n, block_k, mode, warps, stages, split)
    return config


def neighbours(config: tuple, m: int, n: int, k: int, pattern: tuple[int, int],
               bits: int) -> list[tuple]:  # fmt: skip
    """Every valid configuration one step away: one block size doubled or halved, one stage
    more or less, or another product path."""
    config = _full(config)
    steps = []
    for name in ("BLOCK_N", "BLOCK_K", "BLOCK_M", "warps", "SPLIT_K"):
        for factor in (2, 0.5):
            changed = list(config)
            changed[INDEX[name]] = int(config[INDEX[name]] * factor)
            steps.append(tuple(changed))
    for delta in (1, -1):
        changed = list(config)
        changed[INDEX["stages"]] += delta
        steps.append(tuple(changed))
    for mode in MODES:
        if mode != config[3]:
            changed = list(config)
            changed[INDEX["MODE"]] = mode
            if mode == "dot":
                changed[0] = max(16, changed[0])
            steps.append(tuple(changed))
    seen, result = {config}, []
    for step in steps:
        if step not in seen and valid(step, m, n, k, pattern, bits):
            seen.add(step)
            result.append(step)
    return result


def coordinate_search(
    start: tuple,
    neighbours_of: Callable[[tuple], list[tuple]],
    measure: Callable[[tuple], float | None],
    budget_s: float,
    min_gain: float = 0.01,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[tuple, float | None, list[dict]]:
    """Walk from ``start`` to the best neighbour while one is at least ``min_gain`` faster.
    ``measure`` returns microseconds, or None for a configuration that fails (it is skipped).
    Returns (best configuration, its time, every measurement in order)."""
    started = clock()
    measured: dict[tuple, float | None] = {}
    history: list[dict] = []

    def timed(config: tuple) -> float | None:
        if config not in measured:
            measured[config] = measure(config)
            history.append({"config": list(config), "microseconds": measured[config]})
        return measured[config]

    best, best_time = start, timed(start)
    improved = True
    while improved and clock() - started < budget_s:
        improved = False
        candidate, candidate_time = best, best_time
        for step in neighbours_of(best):
            if clock() - started >= budget_s:
                break
            step_time = timed(step)
            if step_time is None:
                continue
            if candidate_time is None or step_time < candidate_time:
                candidate, candidate_time = step, step_time
        if candidate != best and (best_time is None or candidate_time < best_time * (1 - min_gain)):
            best, best_time, improved = candidate, candidate_time, True
    return best, best_time, history
