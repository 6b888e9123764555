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

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adan.kernels.triton import BLOCK, QBLOCK, launch_options
from adan.kernels.triton.device import _adan_kernel

ARGS = {"table": "*i64", "tiles": "*i32", "grads": "*i64", "counters": "*i32",
        "factor_ptr": "*fp32", "lr_ptr": "*fp32", "hyper": "*fp64", **{name: "fp32" for name in (
            "keep_value", "scale_value", "beta1", "omb1", "beta2", "omb2", "beta3", "omb3",
            "eps")}}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
FORMATS = {"param": 0, "fp32": 0, "bf16": 1, "int8": 2}
"""A state_dtype setting: its kernel format (the state dtype is the parameter's for "param",
float32 for "fp32" and "int8" (the kernel's S_DT for 8-bit codes), bfloat16 for "bf16")."""


WITH_OPTIONS = ("fp32-param", "bf16-bf16", "fp32-int8")
"""The variants also built with every option at once (no_prox, maximize, a gradient factor, a
tensor lr, and bf16 parameters rounded stochastically): the plain kernel, the one whose
parameters round stochastically and the largest."""


def _variants() -> dict[str, tuple[str, str, int, bool, bool, bool, bool, bool]]:
    """name: (param dtype, state dtype, format, no_prox, maximize, factor, tensor lr, SR
    param): every parameter dtype with every state format (float32 parameters' "param" state
    is their "fp32" one) without options, and :data:`WITH_OPTIONS` with all of them."""
    out = {}
    for param in DTYPES:
        for state, fmt in FORMATS.items():
            if param == "fp32" and state == "fp32":
                continue
            name = f"{param}-{state}"
            dtype = param if state == "param" else "bf16" if state == "bf16" else "fp32"
            out[name] = (param, dtype, fmt, False, False, False, False, False)
            if name in WITH_OPTIONS:
                out[name + "-options"] = (param, dtype, fmt, True, True, True, True,
                                          param == "bf16")
    return out


VARIANTS = _variants()
TILES = {"": (True, False), "/partial": (True, True), "/misaligned": (False, False),
         "/misaligned-partial": (False, True)}
"""The launches of each variant: (ALIGNED, MASKED) by name suffix."""


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
REGISTERS_PER_SM, SHARED_PER_SM, WARPS_PER_SM = 65536, 228 * 1024, 64


def sass_figures(cubin: bytes, warps: int) -> dict[str, float]:
    """Registers, shared memory, CTAs per SM (H100/H200 limits), and SASS instructions per
    element, barriers and spill accesses per tile (the kernel has no loops: its static count
    is what a full tile runs)."""
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
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)", sass)
    return {"registers": regs, "shared": shared, "ctas_per_sm": ctas,
            "instr_per_elem": round(len(instructions) / (BLOCK / threads), 1),
            "barriers": sum(i.startswith("BAR") for i in instructions),
            "spills": sum(i.startswith(("LDL", "STL")) for i in instructions)}


def build(param: str, state: str, fmt: int, no_prox: bool, maximize: bool, factor: bool,
          tensor_lr: bool, sr_param: bool, aligned: bool = True, masked: bool = False
          ) -> dict[str, float]:
    """Compile one launch variant for sm_90 and read its figures."""
    options = launch_options(fmt, masked, aligned)  # as the kernel is launched
    constants = dict(P_DT=DTYPES[param], G_DT=DTYPES[param], S_DT=DTYPES[state],
                     STEP_DT=tl.float32, FMT=fmt, NO_PROX=no_prox, MAXIMIZE=maximize,
                     HAS_FACTOR=factor, LR_ON_DEVICE=tensor_lr, SR_PARAM=sr_param,
                     ALIGNED=aligned, MASKED=masked, BLOCK=BLOCK, TILE=options.pop("TILE"),
                     QBLOCK=QBLOCK)  # in the kernel's order of arguments
    signature = {**ARGS, **{name: "constexpr" for name in constants}}
    names = list(signature)
    source = ASTSource(
        fn=_adan_kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        # as Triton specialises pointer arguments at launch (torch's allocations are aligned)
        attrs={(i,): [["tt.divisibility", 16]] for i, k in enumerate(ARGS)
               if ARGS[k].startswith("*")})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {"ld_v4": ptx.count("ld.global.v4"), "st_v4": ptx.count("st.global.v4"),
            "local": ptx.count(".local"), "cubin_bytes": len(kernel.asm["cubin"]),
            "not_ieee": not_ieee(ptx),
            "barrier_before_atomic": barrier_before_atomic(ptx),
            "warps": options["num_warps"],
            **sass_figures(kernel.asm["cubin"], options["num_warps"])}


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


def _build_named(name: str) -> tuple[str, dict[str, float]]:
    """``name`` is a variant and a :data:`TILES` suffix."""
    base, _, tiles = name.partition("/")
    aligned, masked = TILES["/" + tiles if tiles else ""]
    return name, build(*VARIANTS[base], aligned=aligned, masked=masked)


if __name__ == "__main__":
    # Each build is a compile and a ptxas run, mostly single-threaded: one process per core.
    names = [v + t for v in (sys.argv[1:] or VARIANTS) for t in TILES]
    with ProcessPoolExecutor(min(len(names), os.cpu_count() or 1)) as pool:
        out = dict(pool.map(_build_named, names))
    print(json.dumps(out))
