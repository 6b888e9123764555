"""The CUDA kernel compiles for sm_90 (H100/H200) without a GPU, and its full tiles move data in
16-byte accesses: a kernel that loads one element at a time reaches a fraction of the
bandwidth. Built with Triton's own ptxas in a subprocess (the tests run Triton interpreted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

# Per thread of a full tile (2048 elements, 256 threads: 8 each): 16-byte loads and stores of
# the param, the gradient and the four buffers (two per array for 4-byte elements, one for
# 2-byte ones; 8-bit codes are 8 bytes per thread, below a vector).
EXPECTED = {
    "fp32": (12, 10), "fp32-all-options": (12, 10), "bf16": (6, 5), "bf16-sr-param": (6, 5),
    "fp16-fp32-state": (10, 9), "bf16-state": (8, 6), "int8-state": (4, 2),
}


@pytest.fixture(scope="module")
def built():
    if not Path(triton.__file__).parent.joinpath("backends", "nvidia", "bin", "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_build.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_kernel_compiles_for_sm90_with_wide_accesses_and_no_spills(built, variant):
    result = built[variant]
    loads, stores = EXPECTED[variant]
    assert result["cubin_bytes"] > 0
    assert result["local"] == 0  # no register spills to local memory
    assert (result["ld_v4"], result["st_v4"]) == (loads, stores)
