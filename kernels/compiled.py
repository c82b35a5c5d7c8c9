"""What the kernels compile to for a GPU this machine need not have: registers, spills, shared
memory, the kinds of global loads, and from them how many programs fit on one SM.

Triton compiles ahead of time for any target (its wheel ships ptxas and cuobjdump), so the
properties that decide a memory-bound kernel's speed — are the weight loads 16-byte
``cp.async`` prefetches or plain loads waited on, does the tile spill, how many programs share
an SM — can be checked on a CPU-only machine and in CI, and configurations that cannot be fast
can be ruled out before a GPU is lent. Needs ``TRITON_INTERPRET`` unset when triton is imported
(the interpreter replaces the compiler).

    python -m spa_compiler.kernels.compiled   # every decode configuration for sm_90, a table
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from spa_compiler.kernels import nm_matmul
from triton.backends.compiler import GPUTarget

# sm_90 (H100/H200) limits per SM, from NVIDIA's CUDA C programming guide (compute capability
# 9.0): registers, threads, resident blocks and shared memory usable by blocks.
SM90 = {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 227 * 1024, "sms": 132}
DTYPE_POINTERS = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_LOAD = re.compile(r"(?:ld\.global|cp\.async\.c[ag]\.shared\.global)(?:\.[a-z0-9_]+)*")


@dataclass
class CompiledKernel:
    registers: int
    stack_bytes: int
    shared_bytes: int
    warps: int
    loads: dict[str, int] = field(default_factory=dict)
    loop: dict[str, int] = field(default_factory=dict)  # K loop's machine instructions

    @property
    def loop_length(self) -> int:
        return sum(self.loop.values())

    def per_thread(self, work: int) -> float:
        """K-loop machine instructions for each of ``work`` items one loop step does (a
        step's kept values, say), per thread."""
        return self.loop_length * 32 * self.warps / work

    @property
    def prefetched_loads(self) -> int:
        """Global loads issued as ``cp.async`` copies: software-pipelined, in flight while
        earlier K-steps compute."""
        return sum(n for kind, n in self.loads.items() if kind.startswith("cp.async"))

    @property
    def waited_loads(self) -> int:
        """Plain global loads, waited on where their K-step computes (Triton leaves loads of
        under 4 bytes a thread unpipelined: a short activation tile over many threads)."""
        return sum(n for kind, n in self.loads.items() if kind.startswith("ld.global"))

    def programs_per_sm(self, limits: dict = SM90) -> int:
        threads = 32 * self.warps
        # registers are allocated per warp in units of 256 (8 per thread)
        per_warp = 256 * -(-self.registers * 32 // 256)
        by_registers = limits["registers"] // (per_warp * self.warps)
        by_shared = limits["shared"] // self.shared_bytes if self.shared_bytes else limits["blocks"]
        return min(by_registers, by_shared, limits["threads"] // threads, limits["blocks"])


def _tools_dir() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        return subprocess.run(
            [os.path.join(_tools_dir(), "cuobjdump"), flag, path],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the one kernel in ``cubin``."""
    usage = _cuobjdump(cubin, "-res-usage")
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    if registers is None or stack is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count:\n{usage}")
    return int(registers.group(1)), int(stack.group(1))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _loop_instructions(cubin: bytes) -> dict[str, int]:
    """Machine instructions of the longest loop (the K loop): opcode -> count, counted from a
    backward branch's target to the branch."""
    lines = [
        (int(m.group(1), 16), m.group(3), m.group(4))
        for m in map(_SASS_LINE.search, _cuobjdump(cubin, "-sass").splitlines())
        if m
    ]
    best: list[str] = []
    for address, opcode, operands in lines:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            body = [op for a, op, _ in lines if int(target.group(1), 16) <= a <= address]
            best = body if len(body) > len(best) else best
    counts: dict[str, int] = {}
    for opcode in best:
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def _compile(kernel, signature: dict, constants: dict, warps: int, stages: int,
             capability: int, known: dict | None = None) -> CompiledKernel:  # fmt: skip
    """Compile ``kernel`` as the JIT would for these arguments: pointers and sizes divisible
    by 16 (the shapes spa times) unless ``known`` gives a value that is not, arguments equal
    to 1 folded into constants."""
    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    known = known or {}
    divisible = [name for name in signature
                 if name not in constants and known.get(name, 16) % 16 == 0]  # fmt: skip
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = triton.compiler.ASTSource(fn=kernel, signature=full, constexprs=constants,
                                       attrs=attrs)  # fmt: skip
    target = GPUTarget("cuda", capability, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": warps, "num_stages": stages}
    )
    compiled = triton.compile(source, target=target, options=options.__dict__)
    loads: dict[str, int] = {}
    for match in _LOAD.finditer(compiled.asm["ptx"]):
        loads[match.group(0)] = loads.get(match.group(0), 0) + 1
    registers, stack = _resources(compiled.asm["cubin"])
    return CompiledKernel(registers, stack, compiled.metadata.shared, warps, loads,
                          _loop_instructions(compiled.asm["cubin"]))  # fmt: skip


def _rows(m: int) -> dict:
    """M and its bucket as the JIT sees them: M = 4 is an i32 not divisible by 16 (marking it
    so changed the registers and spills ptxas gave the M = 4 tiles)."""
    return {"M": m, "M_BUCKET": triton.next_power_of_2(m)}


def compile_nm(config: tuple, pattern: tuple[int, int] = (2, 4), dtype: str = "fp16",
               m: int = 1, capability: int = 90) -> CompiledKernel:  # fmt: skip
    """The sparse kernel for one configuration tuple of ``nm_matmul`` (BLOCK_M, BLOCK_N,
    BLOCK_K, MODE, warps, stages[, SPLIT_K]); ``m = 1`` folds M into a constant as the JIT does."""
    block_m, block_n, block_k, mode, warps, stages, split = nm_matmul._full(config)
    keep, group = pattern
    bits = 2 if group <= 4 else 4
    block_k = nm_matmul._whole_words(block_k, keep, group, bits)
    pointer = DTYPE_POINTERS[dtype]
    signature = {
        "x_ptr": pointer, "values_ptr": pointer, "words_ptr": "*i32", "bias_ptr": pointer,
        "out_ptr": pointer, "partial_ptr": "*fp32", "arrivals_ptr": "*i32",
        "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
        "stride_xm": "i32", "stride_vn": "i32", "stride_wn": "i32", "stride_om": "i32",
    }  # fmt: skip
    constants = {
        "stride_xk": 1, "stride_on": 1, "KEEP": keep, "GROUP": group, "BITS": bits,
        "HAS_BIAS": False, "ACTIVATION": 0, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCK_K": block_k, "MODE": nm_matmul.MODES[mode], "GROUP_SIZE_M": nm_matmul.GROUP_SIZE_M,
        "SPLIT_K": split, "IEEE": dtype == "fp32", "LOOP_STAGES": stages,
        "PAIRS": pattern == (2, 4) and dtype != "fp32",
    }  # fmt: skip
    if m == 1:
        constants.update(M=1, M_BUCKET=1)
    return _compile(nm_matmul.nm_matmul_kernel, signature, constants, warps, stages, capability,
                    _rows(m))  # fmt: skip


def compile_dense(config: tuple, dtype: str = "fp16", m: int = 1,
                  capability: int = 90) -> CompiledKernel:  # fmt: skip
    """The dense Triton baseline for one configuration tuple (no gather, no split-K)."""
    block_m, block_n, block_k, mode, warps, stages = config[:6]
    pointer = DTYPE_POINTERS[dtype]
    signature = {
        "x_ptr": pointer, "w_ptr": pointer, "bias_ptr": pointer, "out_ptr": pointer,
        "M": "i32", "N": "i32", "K": "i32", "M_BUCKET": "i32",
        "stride_xm": "i32", "stride_wn": "i32", "stride_om": "i32",
    }  # fmt: skip
    constants = {
        "stride_xk": 1, "stride_wk": 1, "stride_on": 1, "HAS_BIAS": False, "ACTIVATION": 0,
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
        "MODE": nm_matmul.MODES[mode], "GROUP_SIZE_M": nm_matmul.GROUP_SIZE_M,
        "IEEE": dtype == "fp32", "LOOP_STAGES": stages,
    }  # fmt: skip
    if m == 1:
        constants.update(M=1, M_BUCKET=1)
    return _compile(nm_matmul.dense_matmul_kernel, signature, constants, warps, stages,
                    capability, _rows(m))  # fmt: skip


def kept_per_step(config: tuple, pattern: tuple[int, int]) -> int:
    """Kept weight values one program reads per K-step."""
    _, block_n, block_k, *_ = nm_matmul._full(config)
    return block_n * block_k * pattern[0] // pattern[1]


def programs(config: tuple, m: int, n: int) -> int:
    """Programs ``nm_matmul`` launches for an [m, n] output with this configuration."""
    block_m, block_n, *_, split = nm_matmul._full(config)
    return -(-m // block_m) * -(-n // block_n) * split


def issue_floor_us(compiled: CompiledKernel, config: tuple, m: int, n: int, k: int,
                   sms: int, clock_hz: float) -> float:  # fmt: skip
    """The K loops' time if every SM issued one warp instruction per scheduler (4) per clock:
    a floor no memory speed can beat. Against the memory floor (bytes over the copy rate) it
    tells an instruction-bound kernel from a memory-bound one."""
    block_m, block_n, block_k, *_ = nm_matmul._full(config)
    tiles = -(-m // block_m) * -(-n // block_n)
    steps = -(-k // block_k)  # split-K shares a tile's steps among programs: the same total
    warp_instructions = compiled.loop_length * compiled.warps * steps * tiles
    return 1e6 * warp_instructions / (sms * 4 * clock_hz)


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, K = N = 8192, fp16")
    print(
        "pattern  M  config                             regs stack shared  async waited"
        "  /SM  programs (GPU holds)"
    )
    for pattern in ((2, 4), (4, 8)):
        for m in (1, 4, 8):
            for config in nm_matmul._configs_for(m):
                if config[3] == "dot" and m < 8:
                    continue
                built = compile_nm(config, pattern, m=m)
                per_sm = built.programs_per_sm()
                print(f"{pattern[0]}:{pattern[1]}  {m:>2}  {nm_matmul._full(config)!s:<34}"
                      f"{built.registers:>5} {built.stack_bytes:>5} {built.shared_bytes:>6}"
                      f"  {built.prefetched_loads:>5} {built.waited_loads:>6} {per_sm:>4}"
                      f"  {programs(config, m, 8192):>8} ({per_sm * SM90['sms']})"
                      f"  {built.per_thread(kept_per_step(config, pattern)):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
