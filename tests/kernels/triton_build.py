"""Compile the CUDA kernel for a Hopper GPU (sm_90) without one, with the ptxas that ships with
Triton, and print what the PTX holds per variant as JSON. Run by test_cuda_triton_build.py in a
process of its own: the tests' process runs Triton in interpreter mode, which compiles nothing.
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adan.kernels import cuda_triton

ARGS = {"table": "*i64", "tiles": "*i32", "counters": "*i32", "factor_ptr": "*fp32",
        "lr_ptr": "*fp32", "seed": "i64", **{name: "fp32" for name in (
            "lr_value", "beta1", "omb1", "beta2", "omb2", "beta3", "omb3", "log_b1", "log_b2",
            "log_b3", "eps", "weight_decay")}}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
# name: (param dtype, state dtype, format, no_prox, maximize, factor, tensor lr, SR param)
VARIANTS = {
    "fp32": ("fp32", "fp32", 0, False, False, False, False, False),
    "fp32-all-options": ("fp32", "fp32", 0, True, True, True, True, False),
    "bf16": ("bf16", "bf16", 0, False, False, True, False, False),
    "bf16-sr-param": ("bf16", "bf16", 0, False, False, True, False, True),
    "fp16-fp32-state": ("fp16", "fp32", 0, False, False, False, False, False),
    "bf16-state": ("fp32", "bf16", 1, False, False, True, False, False),
    "int8-state": ("fp32", "fp32", 2, False, True, True, True, False),
}


def build(param: str, state: str, fmt: int, no_prox: bool, maximize: bool, factor: bool,
          tensor_lr: bool, sr_param: bool) -> dict[str, int]:
    constants = dict(P_DT=DTYPES[param], G_DT=DTYPES[param], S_DT=DTYPES[state],
                     STEP_DT=tl.float32, FMT=fmt, NO_PROX=no_prox, MAXIMIZE=maximize,
                     HAS_FACTOR=factor, LR_ON_DEVICE=tensor_lr, SR_PARAM=sr_param,
                     RANDOM=fmt != 0 or sr_param, ALIGNED=True, BLOCK=cuda_triton.BLOCK,
                     QBLOCK=cuda_triton.QBLOCK, NCOL=cuda_triton.NCOL)
    signature = {**ARGS, **{name: "constexpr" for name in constants}}
    names = list(signature)
    source = ASTSource(
        fn=cuda_triton._adan_kernel, signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        # as Triton specialises pointer arguments at launch (torch's allocations are aligned)
        attrs={(i,): [["tt.divisibility", 16]] for i, k in enumerate(ARGS)
               if ARGS[k].startswith("*")})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cuda_triton.NUM_WARPS})
    ptx = kernel.asm["ptx"]
    return {"ld_v4": ptx.count("ld.global.v4"), "st_v4": ptx.count("st.global.v4"),
            "local": ptx.count(".local"), "cubin_bytes": len(kernel.asm["cubin"])}


if __name__ == "__main__":
    names = sys.argv[1:] or list(VARIANTS)
    print(json.dumps({name: build(*VARIANTS[name]) for name in names}))
