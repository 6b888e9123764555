"""The CUDA kernel compiles for sm_90 (H100/H200) without a GPU, its full tiles move data in
16-byte accesses (a kernel that loads one element at a time reaches a fraction of the
bandwidth), nothing spills, and registers leave room for 2 or more CTAs per SM: the speed
evidence there is without a GPU (docs/benchmarks.md says what it predicts). Built with
Triton's own ptxas in a subprocess (the tests run Triton interpreted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

# Per thread of a full program (4096 elements in two tiles, 256 threads: 8 each per tile):
# 16-byte loads and stores of the param, the gradient and the four buffers (two per array per
# tile for 4-byte elements, one for 2-byte ones); 8-bit codes take 4-byte accesses, so that
# their tiles keep the float32 tiles' layout (a block in one warp).
EXPECTED = {
    "fp32": (24, 20), "fp32-all-options": (24, 20), "bf16": (12, 10), "bf16-sr-param": (12, 10),
    "fp16-fp32-state": (20, 18), "bf16-state": (16, 12), "int8-state": (8, 4),
}


@pytest.fixture(scope="module")
def built():
    if not Path(triton.__file__).parent.joinpath("backends", "nvidia", "bin", "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as Triton 3.9 defaults, quietly
    script = Path(__file__).with_name("triton_build.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_kernel_compiles_for_sm90_with_wide_accesses_and_no_spills(built, variant):
    result = built[variant]
    loads, stores = EXPECTED[variant]
    assert result["cubin_bytes"] > 0
    assert result["local"] == 0 and built[variant + "/partial"]["local"] == 0  # no spills
    assert (result["ld_v4"], result["st_v4"]) == (loads, stores)


# Every kernel but the 8-bit one's partial tiles (at most one program per tensor), which
# holds one CTA per SM.
TWO_CTAS = [v + tiles for v in EXPECTED for tiles in ("", "/partial")
            if v + tiles != "int8-state/partial"]


@pytest.mark.parametrize("kernel", TWO_CTAS)
def test_kernels_fit_two_ctas_per_sm(built, kernel):
    """Full and partial tiles launch apart, so each kernel holds one branch's registers."""
    assert built[kernel]["ctas_per_sm"] >= 2


def test_fp32_full_tiles_within_96_registers(built):
    assert built["fp32"]["registers"] <= 96


def test_int8_kernel_does_not_grow(built):
    """The 8-bit kernel is above its target (<= 160 SASS instructions per element): what its
    power codes cost is in docs/benchmarks.md; its current figures are a bound, so it only
    improves. (It was 546 before its blocks were laid out one per warp.)"""
    assert built["int8-state"]["instr_per_elem"] <= 410
    assert built["int8-state"]["registers"] <= 128
