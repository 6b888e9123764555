"""Compile the CUDA kernel for a Hopper GPU (sm_90) without one, with the ptxas that ships with
Triton, and print per variant, as JSON, what the PTX and the SASS (from the bundled
``cuobjdump``) hold: wide accesses, float operations that may not round as IEEE's, spills
(local memory in the PTX, and local loads and stores in the SASS, where ptxas spills under a
register cap), registers, shared memory, the CTAs of 8 warps an SM can hold, SASS
instructions per element of a tile and barriers per tile. Run by test_cuda_triton_build.py
in a process of its own: the tests' process runs Triton in interpreter mode, which compiles
nothing.

    python tests/kernels/triton_build.py [VARIANT ...]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adan.kernels.triton import BLOCK, QBLOCK, launch_options
from adan.kernels.triton.device import _adan_kernel, _scalars_kernel
from adan.kernels.triton.launch import SCALAR_OPTIONS, SCALAR_ROWS

ARGS = {"table": "*i64", "tiles": "*i32", "grads": "*i64", "counters": "*i32",
        "factor_ptr": "*fp32", "scalars": "*fp32", **{name: "fp32" for name in (
            "beta1", "omb1", "beta2", "omb2", "beta3", "omb3", "eps")}}
SCALAR_ARGS = {"table": "*i64", "count": "i32", "scalars": "*fp32", "lr_ptr": "*fp32",
               "hyper": "*fp64", "keep_value": "fp32", "scale_value": "fp32"}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
FORMATS = {"param": 0, "fp32": 0, "bf16": 1, "int8": 2}
"""A state_dtype setting: its kernel format (the state dtype is the parameter's for "param",
float32 for "fp32" and "int8" (the kernel's S_DT for 8-bit codes), bfloat16 for "bf16")."""


WITH_OPTIONS = ("fp32-param", "bf16-bf16", "fp32-int8")
"""The variants also built with every option at once (maximize, a gradient factor, and bf16
parameters rounded stochastically): the plain kernel, the one whose parameters round
stochastically and the largest. (no_prox and a tensor lr are the scalars' kernel's.)"""


def _variants() -> dict[str, tuple[str, str, int, bool, bool, bool]]:
    """name: (param dtype, state dtype, format, maximize, factor, SR param): every parameter
    dtype with every state format (float32 parameters' "param" state is their "fp32" one)
    without options, and :data:`WITH_OPTIONS` with all of them."""
    out = {}
    for param in DTYPES:
        for state, fmt in FORMATS.items():
            if param == "fp32" and state == "fp32":
                continue
            name = f"{param}-{state}"
            dtype = param if state == "param" else "bf16" if state == "bf16" else "fp32"
            out[name] = (param, dtype, fmt, False, False, False)
            if name in WITH_OPTIONS:
                out[name + "-options"] = (param, dtype, fmt, True, True, param == "bf16")
    return out


VARIANTS = _variants()
TILES = {"": (True, False), "/partial": (True, True), "/misaligned": (False, False),
         "/misaligned-partial": (False, True)}
"""The launches of each variant: (ALIGNED, MASKED) by name suffix."""


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64


def sass_figures(cubin: bytes, warps: int, elements: int = BLOCK) -> dict[str, float]:
    """Registers, shared memory, CTAs per SM (H100/H200 limits); SASS instructions per element
    of a program's ``elements``, in the code (``instr_per_elem``) and executed by a thread on
    the common path (``executed_per_elem``: :func:`executed`); barriers and spill accesses in
    the code."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    threads = 32 * warps
    per_cta = -(-regs // 8) * 8 * threads
    ctas = min(REGISTERS_PER_SM // per_cta, WARPS_PER_SM * 32 // threads,
               SHARED_PER_SM // shared if shared else 99)
    instructions = [op for _, _, op, _ in _SASS_LINE.findall(sass)]  # predicated ones too
    return {"registers": regs, "shared": shared, "ctas_per_sm": ctas,
            "instr_per_elem": round(len(instructions) / (elements / threads), 1),
            "executed_per_elem": round(executed(sass) / (elements / threads), 1),
            "barriers": sum(i.startswith("BAR") for i in instructions),
            "spills": sum(i.startswith(("LDL", "STL")) for i in instructions)}


def build(param: str, state: str, fmt: int, maximize: bool, factor: bool, sr_param: bool,
          aligned: bool = True, masked: bool = False) -> dict[str, float]:
    """Compile one launch variant for sm_90 and read its figures."""
    options = launch_options(fmt, masked, aligned)  # as the kernel is launched
    constants = dict(P_DT=DTYPES[param], G_DT=DTYPES[param], S_DT=DTYPES[state],
                     STEP_DT=tl.float32, FMT=fmt, MAXIMIZE=maximize, HAS_FACTOR=factor,
                     SR_PARAM=sr_param, ALIGNED=aligned, MASKED=masked, BLOCK=BLOCK,
                     TILE=options.pop("TILE"), QBLOCK=QBLOCK,
                     COMPILED=True)  # in the kernel's order
    return _figures(_compile(_adan_kernel, ARGS, constants, options), options["num_warps"])


def build_scalars(no_prox: bool, tensor_lr: bool) -> dict[str, float]:
    """Compile the step scalars' kernel for sm_90 and read its figures (per element: per
    tensor)."""
    constants = dict(STEP_DT=tl.float32, NO_PROX=no_prox, LR_ON_DEVICE=tensor_lr,
                     ROWS=SCALAR_ROWS)
    return _figures(_compile(_scalars_kernel, SCALAR_ARGS, constants, dict(SCALAR_OPTIONS)),
                    SCALAR_OPTIONS["num_warps"], SCALAR_ROWS)


def _compile(fn: Any, args: dict[str, str], constants: dict[str, Any],
             options: dict[str, Any]) -> Any:
    signature = {**args, **{name: "constexpr" for name in constants}}
    names = list(signature)
    source = ASTSource(
        fn=fn, signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        # as Triton specialises pointer arguments at launch (torch's allocations are aligned)
        attrs={(i,): [["tt.divisibility", 16]] for i, k in enumerate(args)
               if args[k].startswith("*")})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _figures(kernel: Any, warps: int, elements: int = BLOCK) -> dict[str, float]:
    ptx = kernel.asm["ptx"]
    return {"ld_v4": ptx.count("ld.global.v4"), "st_v4": ptx.count("st.global.v4"),
            "local": ptx.count(".local"), "cubin_bytes": len(kernel.asm["cubin"]),
            "not_ieee": not_ieee(ptx),
            **({"barrier_before_atomic": barrier_before_atomic(ptx)} if "atom." in ptx else {}),
            "warps": warps, **sass_figures(kernel.asm["cubin"], warps, elements)}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def executed(sass: str) -> int:
    """The instructions one thread of a program executes on its common path, read from the
    SASS by following its branches: the IEEE division's and square root's slow paths (a call,
    taken only for subnormal, huge or non-finite operands) are skipped, every other branch
    falls through to the work (a skipped step's exit is not the common path), and the walk
    ends at the first unconditional EXIT. The static count also holds those call sites, the
    subroutines they call and the padding after the last EXIT, which no thread runs there."""
    code = [(int(a, 16), pred, op, args) for a, pred, op, args in _SASS_LINE.findall(sass)]
    at = {address: i for i, (address, *_) in enumerate(code)}
    count, i = 0, 0
    for _ in range(len(code) * 2):  # no loops: a walk longer than the code is a bug
        address, pred, op, args = code[i]
        count += 1
        if op == "EXIT" and not pred:
            return count
        if op.startswith("BRA"):
            target = at[int(args.split()[-1], 16)]
            skipped = code[i + 1:target]
            if not pred or (len(skipped) <= 8 and any(c[2].startswith("CALL") for c in skipped)):
                i = target  # an unconditional branch, or one past a slow path's call
                continue
        i += 1
    raise ValueError("the SASS walk did not reach an EXIT")


def not_ieee(ptx: str) -> list[str]:
    """The PTX's float instructions that may not round as IEEE's operations do, which the CPU
    paths compute: approximate divisions, square roots and reciprocals, and multiplies, adds
    and subtractions without ``.rn`` (which ptxas may contract into a fused multiply-add)."""
    ops = re.findall(
        r"\b((?:div|sqrt|rcp|rsqrt|mul|add|sub|fma|ex2|lg2)(?:\.[a-z0-9]+)*\.f(?:32|64))\b", ptx)
    return sorted({op for op in ops if ".rn." not in op})


def barrier_before_atomic(ptx: str) -> bool:
    """Whether a CTA-wide barrier separates the kernel's global loads, the step count's among
    them, from the completion counter's atomic: without one, a warp may still be about to
    read a step count that the last program's atomic lets another thread advance (the kernel
    has no loops, so the text's order is the program's)."""
    lines = ptx.splitlines()
    atomics = [i for i, line in enumerate(lines) if re.search(r"\batom\.", line)]
    if len(atomics) != 1:
        raise ValueError(f"expected one atomic in the PTX, found {len(atomics)}")
    loads = [i for i, line in enumerate(lines[:atomics[0]]) if "ld.global" in line]
    between = lines[loads[-1] if loads else 0:atomics[0]]
    return any(re.search(r"\b(bar\.sync|barrier\.sync|bar\.red|barrier\.red)\b", line)
               for line in between)


SCALAR_VARIANTS = {"scalars": (False, False), "scalars-options": (True, True)}
"""The step scalars' kernel: plain, and with no_prox and a tensor lr."""


def _build_named(name: str) -> tuple[str, dict[str, float]]:
    """``name`` is a variant and a :data:`TILES` suffix, or one of :data:`SCALAR_VARIANTS`."""
    if name in SCALAR_VARIANTS:
        return name, build_scalars(*SCALAR_VARIANTS[name])
    base, _, tiles = name.partition("/")
    aligned, masked = TILES["/" + tiles if tiles else ""]
    return name, build(*VARIANTS[base], aligned=aligned, masked=masked)


if __name__ == "__main__":
    # Each build is a compile and a ptxas run, mostly single-threaded: one process per core.
    chosen = sys.argv[1:] or [*VARIANTS, *SCALAR_VARIANTS]
    names = [n for v in chosen for n in ([v] if v in SCALAR_VARIANTS else [v + t for t in TILES])]
    with ProcessPoolExecutor(min(len(names), os.cpu_count() or 1)) as pool:
        out = dict(pool.map(_build_named, names))
    print(json.dumps(out))
