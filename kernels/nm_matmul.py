"""Triton matmuls ``y = act(x · Wᵀ + b)``: N:M sparse W read compressed, and a dense baseline.

The sparse kernel reads the compressed weight (``nm_layout.NMWeight``: kept values and packed
2/4-bit positions) and never an indexed load: bytes read from memory are what the weight costs
compressed — for fp16 2:4, 9/16 of the dense weight, hence a memory-bound ceiling of
16/9 ≈ 1.78× over a dense GEMV at decode-size M. Three product paths (``MODE``), chosen per
configuration by the autotuner:

- ``dot``: expand each [BLOCK_N, BLOCK_K] tile to dense with selects in registers, then
  ``tl.dot`` on tensor cores (BLOCK_M ≥ 16, rows past M masked);
- ``fma``: the same expansion, then broadcast multiply-adds into a [BLOCK_M, BLOCK_N, BLOCK_K]
  fp32 accumulator reduced once at the end (M ≤ 8, where a 16-row tile is mostly padding);
- ``gather`` (2:4 and 4:8): no expansion at all — each kept value picks its activation with
  selects among the few slots its position can name (positions ascend inside a group, so in 2:4
  p0 ∈ {0,1,2} and p1 ∈ {1,2,3}), and only K·N/M multiply-adds are done. For M = 1 this halves
  the arithmetic, which is what a GEMV at full memory bandwidth cannot afford. It never
  multiplies a pruned weight: an inf or NaN in x where the weight is pruned does not reach the
  output, where the dense product (and the ``dot``/``fma`` paths, 0 · inf) gives NaN.

Every K loop is a ``tl.range(..., num_stages=LOOP_STAGES)``: a kernel's ``num_stages`` only
software-pipelines loads that feed ``tl.dot``, so the ``gather`` and ``fma`` paths — the
memory-bound decode case — used to wait on each K-step's loads before issuing the next
(compiled for sm_90 they were plain ``ld.global``; with the loop attribute they become
``cp.async`` prefetches ``LOOP_STAGES − 1`` steps ahead, and use fewer registers).
``tests/test_kernels.py`` compiles the decode configurations for sm_90 to keep it so.

Large M is compute bound and tensor cores here are dense: ``nm_linear`` expands the whole
weight once (``decompress_kernel``) and calls cuBLAS above ``DENSE_FROM_M`` rows.

Reference implementations (``reference_matmul``, ``NMWeight.to_dense``) sit next to the
kernels; the tests run every path under Triton's CPU interpreter on small and ragged shapes.
"""

from __future__ import annotations

import operator
import os

import torch
import triton
import triton.language as tl
from spa_compiler.kernels.nm_layout import NMWeight

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}
MODES = {"dot": 0, "fma": 1, "gather": 2}
GATHER_PATTERNS = ((2, 4), (4, 8))
# From this many rows on, nm_linear expands the weight and calls cuBLAS: on an H100 the sparse
# kernel won at 64 rows and lost at 256 (BENCHMARKS.md, "Triton N:M kernels").
DENSE_FROM_M = 128

# Block sizes the autotuner chooses from, as (BLOCK_M, BLOCK_N, BLOCK_K, MODE, warps, stages).
# Decode-size M is memory bound: many programs of few rows stream the weight, deep K tiles keep
# loads in flight; fp32 accumulators stay ≤ 8192 per program (64 registers a thread at 4 warps).
# Large M is compute bound: tensor-core tiles, grouped program order for L2 reuse.
SMALL_M_CONFIGS = [
    *[(1, bn, bk, "gather", w, 3) for bn, bk, w in
      ((16, 512, 4), (32, 512, 4), (32, 1024, 8), (64, 512, 8), (8, 1024, 4))],
    # the H100 block search's best at K = N = 4096 and for M = 2-4 (BENCHMARKS.md)
    (1, 8, 512, "gather", 4, 4),
    (4, 16, 256, "gather", 4, 4),
    # split-K (7th entry, sparse kernel only): more programs in flight when N alone is too few
    *[(1, bn, bk, "gather", w, 3, split) for bn, bk, w, split in
      ((16, 512, 4, 4), (32, 512, 4, 4), (64, 256, 8, 4), (32, 256, 4, 8))],
    (4, 32, 256, "gather", 4, 3, 4),
    (16, 32, 128, "dot", 4, 4, 4),
    (16, 64, 128, "dot", 4, 3, 4),
    *[(2, bn, bk, "gather", 4, 3) for bn, bk in ((16, 512), (32, 256))],
    *[(4, bn, bk, "gather", 4, 3) for bn, bk in ((16, 256), (32, 256))],
    *[(8, bn, bk, "gather", 4, 3) for bn, bk in ((16, 128), (16, 256))],
    *[(1, bn, bk, "fma", 4, 3) for bn, bk in ((8, 512), (16, 256))],
    *[(2, 16, 128, "fma", 4, 3), (4, 16, 128, "fma", 4, 3), (8, 16, 64, "fma", 4, 3)],
    (16, 16, 256, "dot", 4, 3),
    (16, 32, 128, "dot", 4, 4),
    (16, 64, 128, "dot", 4, 3),
]  # fmt: skip
MEDIUM_M_CONFIGS = [
    # Up to 16 rows the product is still memory bound and N / BLOCK_N tiles alone leave SMs
    # with one or two programs (8192 / 64 = 128 programs for 132 SMs): split-K as for M ≤ 8.
    *[
        (16, bn, bk, "dot", 4, stages, split)
        for bn, bk, stages, split in (
            (16, 256, 3, 2),
            (32, 128, 4, 4),
            (64, 128, 3, 4),
            (32, 128, 4, 2),  # the H100 block search's best at M = 16, K = N = 8192
        )
    ],
    (16, 16, 256, "dot", 4, 3),
    *[
        (bm, bn, bk, "dot", 4, stages)
        for bm in (16, 32, 64)
        for bn, bk, stages in ((32, 128, 4), (64, 128, 3), (128, 64, 3))
    ],
]
LARGE_M_CONFIGS = [
    (128, 128, 64, "dot", 8, 3),
    (128, 256, 64, "dot", 8, 3),
    (128, 128, 64, "dot", 4, 4),
    (256, 128, 64, "dot", 8, 3),
]
GROUP_SIZE_M = 8
# Pipeline depth of the K loop when a caller fixes the blocks without ``num_stages``
# (Triton's own default).
DEFAULT_STAGES = 3
# The M bucket (not M itself) keys the tuning cache: M = 3 and M = 4 share a choice; the
# pattern keys the sparse kernel's too (a 2:4 gather tile is no 2:8 tile).
AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
NM_AUTOTUNE_KEY = [*AUTOTUNE_KEY, "KEEP", "GROUP", "BITS"]


def _triton_config(block_m, block_n, block_k, mode, warps, stages, split=None) -> triton.Config:
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "MODE": MODES[mode],
              "GROUP_SIZE_M": GROUP_SIZE_M, "LOOP_STAGES": stages}  # fmt: skip
    if split is not None:
        blocks["SPLIT_K"] = split
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


def _full(config: tuple) -> tuple:
    """A config tuple with its split-K entry (1 unless given)."""
    return config if len(config) == 7 else (*config, 1)


def _configs_for(m: int) -> list[tuple]:
    if m <= 8:
        rows = triton.next_power_of_2(m)
        return [c for c in SMALL_M_CONFIGS if c[3] == "dot" or c[0] == rows]
    if m <= 64:
        return [c for c in MEDIUM_M_CONFIGS if c[0] == max(16, triton.next_power_of_2(m))]
    return LARGE_M_CONFIGS


def _describe(config: triton.Config) -> tuple:
    kw = config.kwargs
    mode = {v: k for k, v in MODES.items()}[kw["MODE"]]
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], mode, config.num_warps,
            config.num_stages, kw.get("SPLIT_K", 1))  # fmt: skip


def _tile_words(block_k: int, keep: int, group: int, bits: int) -> int | None:
    """Metadata words per tile row, or None where a tile would end inside a word."""
    kept = block_k * keep // group
    if block_k % group or kept * bits % 32:
        return None
    return kept * bits // 32


def _whole_words(block_k: int, keep: int, group: int, bits: int) -> int:
    """The smallest BLOCK_K from ``block_k`` up (doubling) whose tile holds whole metadata
    words: 1:16 needs 128 where 2:4 takes 32."""
    while _tile_words(block_k, keep, group, bits) is None:
        block_k *= 2
    return block_k


def _prune(configs, named_args, **kwargs):
    wanted = {_full(c) for c in _configs_for(named_args["M"])}
    keep = [c for c in configs if _describe(c) in wanted]
    if "KEEP" not in kwargs:  # the dense kernel: nothing to gather
        return [c for c in keep if c.kwargs["MODE"] != MODES["gather"]]
    pattern = (kwargs["KEEP"], kwargs["GROUP"])
    chosen = []
    for config in keep:
        if config.kwargs["MODE"] == MODES["gather"] and pattern not in GATHER_PATTERNS:
            continue
        block_k = _whole_words(config.kwargs["BLOCK_K"], *pattern, kwargs["BITS"])
        if block_k != config.kwargs["BLOCK_K"]:  # a sparse tile must hold whole words
            config = triton.Config(
                {**config.kwargs, "BLOCK_K": block_k},
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        chosen.append(config)
    return chosen


_BLOCKS = list(dict.fromkeys(SMALL_M_CONFIGS + MEDIUM_M_CONFIGS + LARGE_M_CONFIGS))
NM_CONFIGS = [_triton_config(*_full(c)) for c in _BLOCKS]
DENSE_CONFIGS = [_triton_config(*c) for c in _BLOCKS if c[3] != "gather" and len(c) == 6]


@triton.jit
def _program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """Grouped order: GROUP_SIZE_M row-blocks share each weight column-block while it is in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_SIZE_M * blocks_n
    first_m = (pid // per_group) * GROUP_SIZE_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _positions(words, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, KEEP: tl.constexpr,
               BITS: tl.constexpr):  # fmt: skip
    """Packed int32 words [BLOCK_N, W] -> positions [BLOCK_N, GROUPS, KEEP]."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (BLOCK_N, GROUPS, KEEP))


@triton.jit
def _position_bit(words, BIT: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                  KEEP: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """Packed int32 words [BLOCK_N, W] -> bit ``BIT`` of every position, as booleans
    [BLOCK_N, GROUPS, KEEP]: tested in place (one AND-compare), no field extracted."""
    PER_WORD: tl.constexpr = 32 // BITS
    masks = 1 << (tl.arange(0, PER_WORD) * BITS + BIT)
    return tl.reshape((words[:, :, None] & masks[None, None, :]) != 0, (BLOCK_N, GROUPS, KEEP))


@triton.jit
def _split4(t):
    """[..., 2, 2] (index 2a + c) -> the four [...] slices 0, 1, 2, 3."""
    even, odd = tl.split(t)
    first, third = tl.split(even)
    second, fourth = tl.split(odd)
    return first, second, third, fourth


@triton.jit
def _split8(t):
    """[..., 2, 2, 2] (index 4a + 2b + c) -> the eight [...] slices 0 … 7."""
    even, odd = tl.split(t)
    s0, s2, s4, s6 = _split4(even)
    s1, s3, s5, s7 = _split4(odd)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _join4(s0, s1, s2, s3):
    """Inverse of _split4: [..., 2, 2] holding s0 … s3 at 2a + c."""
    return tl.join(tl.join(s0, s2), tl.join(s1, s3))


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _expand_nm(values, words, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KEEP: tl.constexpr,
               GROUP: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """[BLOCK_N, BLOCK_K·KEEP/GROUP] kept values + packed positions -> the dense
    [BLOCK_N, BLOCK_K] tile, with selects in registers (split/join move no data). Positions
    ascend inside a group, so slot j can only hold kept value i with i ≤ j ≤ i + GROUP − KEEP."""
    G: tl.constexpr = BLOCK_K // GROUP
    positions = _positions(words, BLOCK_N, G, KEEP, BITS)
    if KEEP == 2 and GROUP == 4:
        p0, p1 = tl.split(positions)
        v0, v1 = tl.split(tl.reshape(values, (BLOCK_N, G, 2)))
        zero = tl.zeros_like(v0)
        d0 = tl.where(p0 == 0, v0, zero)
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        d3 = tl.where(p1 == 3, v1, zero)
        dense = _join4(d0, d1, d2, d3)
    elif KEEP == 4 and GROUP == 8:
        p0, p1, p2, p3 = _split4(tl.reshape(positions, (BLOCK_N, G, 2, 2)))
        v0, v1, v2, v3 = _split4(tl.reshape(values, (BLOCK_N, G, 2, 2)))
        zero = tl.zeros_like(v0)
        d0 = tl.where(p0 == 0, v0, zero)
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, tl.where(p2 == 2, v2, zero)))
        d3 = tl.where(p0 == 3, v0, tl.where(p1 == 3, v1, tl.where(p2 == 3, v2, tl.where(
            p3 == 3, v3, zero))))  # fmt: skip
        d4 = tl.where(p0 == 4, v0, tl.where(p1 == 4, v1, tl.where(p2 == 4, v2, tl.where(
            p3 == 4, v3, zero))))  # fmt: skip
        d5 = tl.where(p1 == 5, v1, tl.where(p2 == 5, v2, tl.where(p3 == 5, v3, zero)))
        d6 = tl.where(p2 == 6, v2, tl.where(p3 == 6, v3, zero))
        d7 = tl.where(p3 == 7, v3, zero)
        dense = tl.join(_join4(d0, d2, d4, d6), _join4(d1, d3, d5, d7))
    else:
        # Any other pattern: each slot ORs the bits of the kept values whose position names it
        # (positions in a group are distinct, so one term is not zero): a float sum would turn
        # a kept -0.0 into +0.0 (-0.0 + 0.0) and quiet NaNs, where the expansion must
        # reproduce the weight bit for bit.
        if values.dtype.primitive_bitwidth == 16:
            kept = tl.reshape(values, (BLOCK_N, G, KEEP)).to(tl.int16, bitcast=True)
        else:
            kept = tl.reshape(values, (BLOCK_N, G, KEEP)).to(tl.int32, bitcast=True)
        slots = tl.arange(0, GROUP)[None, None, None, :]
        chosen = tl.where(positions[:, :, :, None] == slots, kept[:, :, :, None], 0)
        dense = tl.reduce(chosen, 2, _bitwise_or).to(values.dtype, bitcast=True)
    return tl.reshape(dense, (BLOCK_N, BLOCK_K)).to(values.dtype)


@triton.jit
def _gather_products(acc, x, values, words, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, KEEP: tl.constexpr, GROUP: tl.constexpr,
                     BITS: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N, G] += Σ over the kept values of a group: value · x[its slot]."""
    G: tl.constexpr = BLOCK_K // GROUP
    x = x.to(tl.float32)  # once per activation, not once per kept value that picks it
    # Each pick is a select tree on the position's bits, tested in place in the packed words.
    if KEEP == 2:  # 2:4: p0 ∈ {0, 1, 2}, p1 ∈ {1, 2, 3}
        low0, low1 = tl.split(_position_bit(words, 0, BLOCK_N, G, KEEP, BITS)[None, :, :, :])
        high0, high1 = tl.split(_position_bit(words, 1, BLOCK_N, G, KEEP, BITS)[None, :, :, :])
        v0, v1 = tl.split(tl.reshape(values, (BLOCK_N, G, 2)).to(tl.float32))
        x0, x1, x2, x3 = _split4(tl.reshape(x, (BLOCK_M, G, 2, 2)))
        x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
        acc += v0[None, :, :] * tl.where(high0, x2, tl.where(low0, x1, x0))
        acc += v1[None, :, :] * tl.where(high1, tl.where(low1, x3, x2), x1)
    else:  # 4:8: p_i ∈ {i, …, i + 4}, three bits each
        shape: tl.constexpr = (1, BLOCK_N, G, 2, 2)
        b0 = _split4(tl.reshape(_position_bit(words, 0, BLOCK_N, G, KEEP, BITS), shape))
        b1 = _split4(tl.reshape(_position_bit(words, 1, BLOCK_N, G, KEEP, BITS), shape))
        b2 = _split4(tl.reshape(_position_bit(words, 2, BLOCK_N, G, KEEP, BITS), shape))
        v0, v1, v2, v3 = _split4(tl.reshape(values, (BLOCK_N, G, 2, 2)).to(tl.float32))
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(tl.reshape(x, (BLOCK_M, G, 2, 2, 2)))
        x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
        x4, x5, x6, x7 = x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :]
        picked0 = tl.where(b2[0], x4, tl.where(b1[0], tl.where(b0[0], x3, x2),
                                               tl.where(b0[0], x1, x0)))  # fmt: skip
        picked1 = tl.where(b2[1], tl.where(b0[1], x5, x4),
                           tl.where(b1[1], tl.where(b0[1], x3, x2), x1))  # fmt: skip
        picked2 = tl.where(b2[2], tl.where(b1[2], x6, tl.where(b0[2], x5, x4)),
                           tl.where(b0[2], x3, x2))  # fmt: skip
        picked3 = tl.where(b2[3], tl.where(b1[3], tl.where(b0[3], x7, x6),
                                           tl.where(b0[3], x5, x4)), x3)  # fmt: skip
        acc += v0[None, :, :] * picked0
        acc += v1[None, :, :] * picked1
        acc += v2[None, :, :] * picked2
        acc += v3[None, :, :] * picked3
    return acc


@triton.jit
def _load_tile(ptr, offs_r, offs_c, rows, cols, stride_r, stride_c):
    """The [len(offs_r), len(offs_c)] tile of a row-major view, zero past rows × cols."""
    return tl.load(
        ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
        mask=(offs_r[:, None] < rows) & (offs_c[None, :] < cols),
        other=0,
    )


@triton.jit
def _load_compressed(values_ptr, words_ptr, offs_n, step, N, K, stride_vn, stride_wn,
                     KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    """K-step ``step`` of rows ``offs_n`` of a compressed weight: kept values and their
    packed-position words (zero past the weight's edges)."""
    KEPT_PER_TILE: tl.constexpr = BLOCK_K * KEEP // GROUP
    WORDS_PER_TILE: tl.constexpr = KEPT_PER_TILE * BITS // 32
    kept_per_row = K // GROUP * KEEP
    offs_v = step * KEPT_PER_TILE + tl.arange(0, KEPT_PER_TILE)
    offs_w = step * WORDS_PER_TILE + tl.arange(0, WORDS_PER_TILE)
    values = _load_tile(values_ptr, offs_n, offs_v, N, kept_per_row, stride_vn, 1)
    words_per_row = tl.cdiv(kept_per_row * BITS, 32)
    words = _load_tile(words_ptr, offs_n, offs_w, N, words_per_row, stride_wn, 1)
    return values, words


@triton.jit
def _expand_24_pairs(pairs, words, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, dtype):
    """2:4 in a 16-bit dtype: each group's two kept values as one int32 ``(v1 << 16) | v0``
    [BLOCK_N, GROUPS] + packed positions -> the dense [BLOCK_N, 4·GROUPS] tile. Slots 0-1 and
    2-3 of a group are each one 32-bit word, built from the pair with shifts and masks under
    a few selects on the group's 4-bit position code (p0 ∈ {0, 1, 2}, p1 ∈ {1, 2, 3}):

        p0 p1 | slots 0-1   slots 2-3          p0 p1 | slots 0-1   slots 2-3
        0  1  | v0 v1       0  0               1  2  | 0  v0       v1 0
        0  2  | v0 0        v1 0               1  3  | 0  v0       0  v1
        0  3  | v0 0        0  v1              2  3  | 0  0        v0 v1

    where selecting whole fp16 values one slot at a time costs several times the
    instructions (the expansion bounds the decode-size dot path and nm_linear's expand)."""
    codes = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    codes = tl.reshape(codes, (BLOCK_N, GROUPS))
    p0 = codes & 3
    p1 = codes >> 2
    zero = tl.zeros_like(pairs)
    first = tl.where(p0 == 0, tl.where(p1 == 1, pairs, pairs & 0xFFFF),
                     tl.where(p0 == 1, pairs << 16, zero))  # fmt: skip
    high_only = pairs & -65536  # 0xFFFF0000
    second = tl.where(p1 == 2, (pairs >> 16) & 0xFFFF,
                      tl.where(p1 == 3, tl.where(p0 == 2, pairs, high_only), zero))  # fmt: skip
    d0 = first.to(tl.int16).to(dtype, bitcast=True)
    d1 = (first >> 16).to(tl.int16).to(dtype, bitcast=True)
    d2 = second.to(tl.int16).to(dtype, bitcast=True)
    d3 = (second >> 16).to(tl.int16).to(dtype, bitcast=True)
    return tl.reshape(_join4(d0, d1, d2, d3), (BLOCK_N, 4 * GROUPS))


@triton.jit
def _dense_tile(values_ptr, words_ptr, offs_n, step, N, K, stride_vn, stride_wn,
                KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """K-step ``step`` of rows ``offs_n`` of the weight, expanded to dense [BLOCK_N, BLOCK_K]
    (``PAIRS``: 2:4 in 16 bits, values read as one int32 per group)."""
    if PAIRS:
        G: tl.constexpr = BLOCK_K // 4
        offs_g = step * G + tl.arange(0, G)
        pairs_ptr = values_ptr.to(tl.pointer_type(tl.int32))
        pairs = _load_tile(pairs_ptr, offs_n, offs_g, N, K // 4, stride_vn // 2, 1)
        offs_w = step * (G // 8) + tl.arange(0, G // 8)
        words = _load_tile(words_ptr, offs_n, offs_w, N, tl.cdiv(K // 4, 8), stride_wn, 1)
        dense = _expand_24_pairs(pairs, words, BLOCK_N, G, values_ptr.dtype.element_ty)
    else:
        values, words = _load_compressed(values_ptr, words_ptr, offs_n, step, N, K, stride_vn,
                                         stride_wn, KEEP, GROUP, BITS, BLOCK_K)  # fmt: skip
        dense = _expand_nm(values, words, BLOCK_N, BLOCK_K, KEEP, GROUP, BITS)
    return dense


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:  # exact GELU, as ONNX Gelu and torch's default
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 3:
        acc = acc * tl.sigmoid(acc)
    return acc


@triton.jit
def _accumulate(acc, x, w, MODE: tl.constexpr, IEEE: tl.constexpr):
    # Both branches assign: a compiled kernel does not stop at a return inside a constexpr if.
    if MODE == 0:
        if IEEE:  # fp32 inputs: full fp32 products, not tensor cores' tf32 default
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    else:
        acc = acc + x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32)
    return acc


@triton.jit
def _finish(acc, MODE: tl.constexpr):
    if MODE == 0:  # noqa: SIM108 - an if statement, as the compiler specialises it reliably
        result = acc
    else:
        result = tl.sum(acc, axis=2)
    return result


@triton.jit
def _store(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on):
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nm_matmul_kernel(
    x_ptr, values_ptr, words_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_vn, stride_wn, stride_om, stride_on,
    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
    LOOP_STAGES: tl.constexpr = None, PAIRS: tl.constexpr = False,
):  # fmt: skip
    pid_m, pid_n = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if MODE == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif MODE == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // GROUP), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    first_step = tl.program_id(1) * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, steps)
    for step in tl.range(first_step, last_step, num_stages=LOOP_STAGES):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        if MODE == 2:
            values, words = _load_compressed(values_ptr, words_ptr, offs_n, step, N, K,
                                             stride_vn, stride_wn, KEEP, GROUP, BITS,
                                             BLOCK_K)  # fmt: skip
            acc = _gather_products(acc, x, values, words, BLOCK_M, BLOCK_N, BLOCK_K, KEEP,
                                   GROUP, BITS)  # fmt: skip
        else:
            w = _dense_tile(values_ptr, words_ptr, offs_n, step, N, K, stride_vn, stride_wn,
                            KEEP, GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS)  # fmt: skip
            acc = _accumulate(acc, x, w, MODE, IEEE)
    acc = _finish(acc, MODE)
    if SPLIT_K == 1:
        acc = _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
        _store(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)
    else:
        # Split-K: every split adds its partial sum into an fp32 buffer; the last split to
        # arrive at this tile reads the total (resetting the buffer and its counter to zero for
        # the next call), applies the epilogue and stores. The barrier and the acq_rel counter
        # order this program's adds before its arrival, as a threadfence reduction does.
        partial = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.atomic_add(partial, acc, mask=inside, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + tl.program_id(0), 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # Read the total where the adds landed (an atomic add of zero reads at L2, past a
            # stale L1), then reset; no other program touches this tile until the next call.
            total = tl.atomic_add(partial, tl.zeros_like(acc), mask=inside, sem="acq_rel")
            tl.store(partial, tl.zeros_like(acc), mask=inside)
            tl.atomic_xchg(arrivals_ptr + tl.program_id(0), 0, sem="relaxed")
            total = _epilogue(total, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
            _store(out_ptr, total, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit
def dense_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, GROUP_SIZE_M: tl.constexpr, IEEE: tl.constexpr,
    LOOP_STAGES: tl.constexpr = None,
):  # fmt: skip
    pid_m, pid_n = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if MODE == 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for step in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=LOOP_STAGES):
        offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk)
        acc = _accumulate(acc, x, w, MODE, IEEE)
    acc = _epilogue(_finish(acc, MODE), bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
    _store(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit
def decompress_kernel(
    values_ptr, words_ptr, out_ptr, N, K, stride_vn, stride_wn, stride_on,
    KEEP: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr = False,
):  # fmt: skip
    """The dense [N, K] weight, one [BLOCK_N, BLOCK_K] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    step = tl.program_id(1)
    offs_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
    dense = _dense_tile(values_ptr, words_ptr, offs_n, step, N, K, stride_vn, stride_wn, KEEP,
                        GROUP, BITS, BLOCK_N, BLOCK_K, PAIRS)  # fmt: skip
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], dense,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))  # fmt: skip


_nm_matmul_tuned = triton.autotune(
    NM_CONFIGS, key=NM_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)(nm_matmul_kernel)
_dense_matmul_tuned = triton.autotune(
    DENSE_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)(dense_matmul_kernel)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Under the CPU interpreter autotuning is meaningless (and slow): one small fixed tile. The
# interpreter computes a bf16 tl.dot wrongly (triton 3.9: off by 1e10), so bf16 multiplies-adds.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "MODE": "dot"}
INTERPRETER_BF16_CONFIG = {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 64, "MODE": "fma"}


# What a fixed ``config`` may name: the blocks and product path, and Triton's launch options.
CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "MODE", "SPLIT_K", "GROUP_SIZE_M", "LOOP_STAGES",
               "num_warps", "num_stages"}  # fmt: skip


def _check_weight(weight) -> None:
    if not isinstance(weight, NMWeight):
        raise ValueError(
            f"weight must be an NMWeight (NMWeight.from_dense, from_compressed or load_archive), "
            f"not {type(weight).__name__}"
        )


def _positive_int(value) -> bool:
    try:
        return not isinstance(value, bool) and operator.index(value) > 0
    except TypeError:
        return False


def _power_of_two(value) -> bool:
    return _positive_int(value) and value & (value - 1) == 0


def _launch_options(config: dict | None, dtype: torch.dtype | None = None) -> dict | None:
    if config is None and interpreting():
        config = INTERPRETER_BF16_CONFIG if dtype == torch.bfloat16 else INTERPRETER_CONFIG
    if config is None:
        return None
    missing = [name for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "MODE") if name not in config]
    if missing:
        raise ValueError(f"config lacks {', '.join(missing)}")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:  # a misspelt SPLIT_K or num_warps was ignored
        raise ValueError(f"config has unknown keys {unknown} (known: {sorted(CONFIG_KEYS)})")
    options = {"GROUP_SIZE_M": GROUP_SIZE_M, **config}
    # tl.arange and the tiles' reshapes need powers of two (and a zero block never ends)
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if not _power_of_two(options[name]):
            raise ValueError(f"{name} must be a power of two, not {options[name]!r}")
    if not _positive_int(options.get("SPLIT_K", 1)):
        # SPLIT_K = 0 launched a grid with no programs: out came back unwritten
        raise ValueError(f"SPLIT_K must be a positive integer, not {options['SPLIT_K']!r}")
    options.setdefault("LOOP_STAGES", options.get("num_stages", DEFAULT_STAGES))
    if options["MODE"] not in MODES:
        raise ValueError(f"MODE must be one of {sorted(MODES)}, not {options['MODE']!r}")
    if options["MODE"] == "dot" and min(options["BLOCK_M"], options["BLOCK_N"],
                                        options["BLOCK_K"]) < 16:  # fmt: skip
        raise ValueError("tensor-core tiles need BLOCK_M, BLOCK_N and BLOCK_K of at least 16")
    options["MODE"] = MODES[options["MODE"]]
    return options


# Pointer offsets are 32-bit inside the kernels.
MAX_ELEMENTS = 2**31 - 1


def _check_inputs(x: torch.Tensor, k: int, n: int, bias, out, activation: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], not {list(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, not {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
    if max(x.shape[0] * k, x.shape[0] * n, n * k) > MAX_ELEMENTS:
        raise ValueError("operands over 2**31 elements need 64-bit offsets the kernels lack")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] in {x.dtype}, not {list(bias.shape)} {bias.dtype}")
    if out is None:
        return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (x.shape[0], n) or out.dtype != x.dtype:
        raise ValueError(
            f"out must be [{x.shape[0]}, {n}] {x.dtype}, not {list(out.shape)} {out.dtype}"
        )
    return out


def _grid(meta: dict, m: int, n: int) -> tuple[int, ...]:
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    return (tiles, meta.get("SPLIT_K", 1))


# Split-K scratch per (device, stream): an fp32 partial-sum buffer and one arrival counter per
# output tile, both zero between calls (the last split of each tile resets its part). A buffer
# outgrown is kept, not freed: a CUDA graph captured earlier may still hold its address.
_SPLIT_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []
# Only decode-size M has split-K configurations (SMALL_M_CONFIGS, 16-row MEDIUM_M_CONFIGS).
SPLIT_K_UP_TO_M = 16


def _split_scratch(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    partial, arrivals = _SPLIT_SCRATCH.get(key, (None, None))
    if partial is None or partial.numel() < m * n:
        if partial is not None:
            _OUTGROWN.append((partial, arrivals))
        # m·n partial sums; tiles ≤ m·n, one arrival counter each
        partial = torch.zeros(max(m * n, 1 << 12), dtype=torch.float32, device=device)
        arrivals = torch.zeros(max(m * n, 1 << 12), dtype=torch.int32, device=device)
        _SPLIT_SCRATCH[key] = (partial, arrivals)
    return partial, arrivals


def _reads_pairs(n: int, m: int, values: torch.Tensor) -> bool:
    """2:4 in a 16-bit dtype whose rows start on 4-byte boundaries: the expansion can read
    each group's two values as one int32 (``_expand_24_pairs``)."""
    return (
        (n, m) == (2, 4)
        and values.element_size() == 2
        and values.data_ptr() % 4 == 0
        and values.stride(0) % 2 == 0
    )


def nm_matmul(
    x: torch.Tensor,
    weight: NMWeight,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``act(x · Wᵀ + bias)`` with W [N, K] N:M sparse, read compressed. ``config`` fixes the
    blocks (BLOCK_M, BLOCK_N, BLOCK_K, MODE; otherwise autotuned per M bucket, N and K)."""
    _check_weight(weight)
    if weight.values.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {weight.values.dtype}")
    m, n = x.shape[0], weight.rows
    out = _check_inputs(x, weight.k, n, bias, out, activation)
    if m == 0 or n == 0:
        return out
    options = _launch_options(config, x.dtype)
    if options is not None:
        options.setdefault("SPLIT_K", 1)
    may_split = m <= SPLIT_K_UP_TO_M if options is None else options["SPLIT_K"] > 1
    partial, arrivals = _split_scratch(x.device, m, n) if may_split else (out, out)
    bias = bias.contiguous() if bias is not None else out  # out: never read without a bias
    args = (
        x, weight.values, weight.words, bias, out, partial, arrivals,
        m, n, weight.k, triton.next_power_of_2(m),
        x.stride(0), x.stride(1), weight.values.stride(0), weight.words.stride(0),
        out.stride(0), out.stride(1),
    )  # fmt: skip
    fixed = {
        "KEEP": weight.n, "GROUP": weight.m, "BITS": weight.bits,
        "HAS_BIAS": bias is not out, "ACTIVATION": ACTIVATIONS[activation],
        "IEEE": x.dtype == torch.float32,
        "PAIRS": _reads_pairs(weight.n, weight.m, weight.values),
    }  # fmt: skip
    if options is None:
        _nm_matmul_tuned[lambda meta: _grid(meta, m, n)](*args, **fixed)
        return out
    if config is None:  # the interpreter's fixed tile, widened for 1:16 and the like
        options["BLOCK_K"] = _whole_words(options["BLOCK_K"], weight.n, weight.m, weight.bits)
    if _tile_words(options["BLOCK_K"], weight.n, weight.m, weight.bits) is None:
        raise ValueError(
            f"BLOCK_K = {options['BLOCK_K']} splits {weight.n}:{weight.m} metadata words"
        )
    if options["MODE"] == MODES["gather"] and (weight.n, weight.m) not in GATHER_PATTERNS:
        raise ValueError(f"MODE 'gather' is written for 2:4 and 4:8, not {weight.n}:{weight.m}")
    nm_matmul_kernel[_grid(options, m, n)](*args, **fixed, **options)
    return out


# The expansion kernel's (BLOCK_N, BLOCK_K, warps) on a GPU; ``benchmark.sweep_decompress``
# measures the alternatives.
DECOMPRESS_BLOCKS = (32, 256, 4)


def decompress(
    weight: NMWeight,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The dense [N, K] weight (``rows`` = (start, stop): those rows only), expanded on the
    device; ``blocks`` = (BLOCK_N, BLOCK_K, warps)."""
    _check_weight(weight)
    start, stop = rows if rows is not None else (0, weight.rows)
    try:
        if isinstance(start, bool) or isinstance(stop, bool):
            raise TypeError
        start, stop = operator.index(start), operator.index(stop)
    except TypeError:
        raise ValueError(f"rows must be two integers (start, stop), not {rows!r}") from None
    if not 0 <= start <= stop <= weight.rows:
        raise ValueError(f"rows {rows} are not inside the weight's {weight.rows}")
    values, words = weight.values[start:stop], weight.words[start:stop]
    n, k = stop - start, weight.k
    if out is None:
        out = torch.empty((n, k), dtype=values.dtype, device=values.device)
    if tuple(out.shape) != (n, k) or (k and out.stride(1) != 1) or out.dtype != values.dtype:
        raise ValueError(f"out must be a row-major [{n}, {k}] {values.dtype} tensor")
    if weight.rows * k > MAX_ELEMENTS:
        raise ValueError("a weight over 2**31 elements needs 64-bit offsets the kernels lack")
    if n == 0:
        return out
    if blocks is None:
        blocks = (16, 64, 4) if interpreting() else DECOMPRESS_BLOCKS
    block_n, block_k, warps = blocks
    if not all(_power_of_two(b) for b in blocks):
        raise ValueError(f"blocks (BLOCK_N, BLOCK_K, warps) must be powers of two, not {blocks}")
    block_k = _whole_words(block_k, weight.n, weight.m, weight.bits)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    decompress_kernel[grid](
        values, words, out, n, k, values.stride(0), words.stride(0), out.stride(0),
        KEEP=weight.n, GROUP=weight.m, BITS=weight.bits, BLOCK_N=block_n, BLOCK_K=block_k,
        PAIRS=_reads_pairs(weight.n, weight.m, values), num_warps=warps,
    )  # fmt: skip
    return out


def nm_linear(
    x: torch.Tensor,
    weight: NMWeight,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    dense_from_m: int = DENSE_FROM_M,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """What a deployment calls: the sparse kernel for decode-size M; from ``dense_from_m``
    rows on, where the product is compute bound, the weight expanded and cuBLAS.

    ``chunk_rows``: expand and multiply that many weight rows at a time through one buffer.
    A buffer that fits in L2 is read by cuBLAS right after the expansion wrote it, so the
    expanded weight need not make the round trip through device memory that expanding it
    whole costs (K = N = 8192 fp16: 134 MB written and read again; on an H100 at M = 4096,
    expanding whole and cuBLAS took 1.06-1.11x cuBLAS's time). None, the default: the whole
    weight at once — on an H100 (BENCHMARKS.md, stop 15) chunks of 512-4096 rows measured
    slower than whole (0.82-0.91x cuBLAS against 0.87-0.94x): narrower GEMMs lose more than
    the saved round trip."""
    _check_weight(weight)
    if chunk_rows is not None and not _positive_int(chunk_rows):
        raise ValueError(f"chunk_rows must be a positive integer, not {chunk_rows!r}")
    if x.shape[0] < dense_from_m:
        return nm_matmul(x, weight, bias, activation)
    if weight.values.dtype != x.dtype:  # as nm_matmul: not torch's error, nor decompress's
        raise ValueError(f"x is {x.dtype} but the weight is {weight.values.dtype}")
    _check_inputs(x, weight.k, weight.rows, bias, None, activation)
    n = weight.rows
    if chunk_rows is None or chunk_rows >= n:
        out = torch.nn.functional.linear(x, decompress(weight), bias)
    else:
        out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        buffer = torch.empty((chunk_rows, weight.k), dtype=x.dtype, device=x.device)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            expanded = decompress(weight, buffer[: stop - start], rows=(start, stop))
            if bias is None:  # out's column block: row-major with a leading dimension of n
                torch.mm(x, expanded.T, out=out[:, start:stop])
            else:
                torch.addmm(bias[start:stop], x, expanded.T, out=out[:, start:stop])
    if activation == "relu":
        out = torch.relu_(out)
    elif activation == "gelu":
        out = torch.nn.functional.gelu(out)
    elif activation == "silu":
        out = torch.nn.functional.silu(out)
    return out


def dense_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``act(x · Wᵀ + bias)`` with a dense W [N, K]: the Triton baseline."""
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the weight is {weight.dtype}")
    m, n = x.shape[0], weight.shape[0]
    out = _check_inputs(x, weight.shape[1], n, bias, out, activation)
    if m == 0 or n == 0:
        return out
    bias = bias.contiguous() if bias is not None else out  # out: never read without a bias
    args = (
        x, weight, bias, out,
        m, n, weight.shape[1], triton.next_power_of_2(m),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
    )  # fmt: skip
    fixed = {"HAS_BIAS": bias is not out, "ACTIVATION": ACTIVATIONS[activation],
             "IEEE": x.dtype == torch.float32}  # fmt: skip
    options = _launch_options(config, x.dtype)
    if options is None:
        _dense_matmul_tuned[lambda meta: _grid(meta, m, n)](*args, **fixed)
        return out
    if options["MODE"] == MODES["gather"]:
        raise ValueError("MODE 'gather' is for sparse weights; use 'dot' or 'fma'")
    if options.pop("SPLIT_K", 1) != 1:
        raise ValueError("SPLIT_K is a sparse-kernel option")
    dense_matmul_kernel[_grid(options, m, n)](*args, **fixed, **options)
    return out


def reference_matmul(
    x: torch.Tensor, dense_weight: torch.Tensor, bias=None, activation: str = "none"
) -> torch.Tensor:
    """The float64 reference both kernels are checked against."""
    y = x.to(torch.float64) @ dense_weight.to(torch.float64).T
    if bias is not None:
        y = y + bias.to(torch.float64)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "silu":
        y = torch.nn.functional.silu(y)
    return y


def tuned_config(kind: str) -> dict[tuple, dict]:
    """The autotuner's choices so far ({key: config}) for ``"nm"`` or ``"dense"``."""
    tuner = _nm_matmul_tuned if kind == "nm" else _dense_matmul_tuned
    chosen = {}
    for key, config in getattr(tuner, "cache", {}).items():
        chosen[tuple(key)] = {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
    return chosen


__all__ = [
    "ACTIVATIONS",
    "DENSE_FROM_M",
    "decompress",
    "dense_matmul",
    "nm_linear",
    "nm_matmul",
    "reference_matmul",
    "tuned_config",
]
