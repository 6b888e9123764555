"""CPU Adan over compact state (bf16, 8-bit, fp32 buffers, rounded parameters) in hand-written
C++ (``cpu_native.cpp``): one pass per element, 8-bit blocks decoded, updated and encoded in
vector registers, the noise hashed in 32-bit words, threads from torch's OpenMP pool, and the
same bits as the eager path (:mod:`adan.kernels.compact`).

Inductor compiles the same step from torch operations but keeps temporaries between loops
(and its noise in int64), which made the 8-bit step 15x the fp32 one; this one is 0.9x
(docs/lowmem.md, "Speed"). Each variant (dtypes and format) is its own small shared library,
compiled by the system's C++ compiler in about half a second, kept in a cache folder keyed by
everything that shapes the code, and called through :mod:`ctypes` (which releases the GIL).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import StepArgs, count_steps
from adan.kernels.compact import seed_of, step_start, step_vector, tensor_step, tensor_views
from adan.numeric.codes import SIGNED_CODE, UNSIGNED_CODE, MxCode
from adan.numeric.scalars import Scalar, real_view
from adan.state.formats import StateFormat, work_dtype

__all__ = ["PARALLEL_MIN", "build", "cache_dir", "cpu_native_adan", "native_compiler_missing"]

SOURCE = Path(__file__).with_name("cpu_native.cpp")
PARALLEL_MIN = 1 << 15
"""Tensors from this many elements are split over torch's intra-op threads, as torch's own
operations split theirs (``at::internal::GRAIN_SIZE``): two threads step 8-bit state 1.8x as
fast from here on (docs/lowmem.md), and a parallel region waits for every thread, which costs
more than it saves for smaller tensors when the cores are busy."""
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-std=c++17", "-shared", "-fPIC", "-pthread")
"""No ``-ffast-math`` and no fused multiply-adds: every operation rounds as torch's do (the
other two let the compiler vectorise a square root and a select, changing no result)."""

OPENMP = (("-fopenmp",), ())
"""With OpenMP the kernel's threads are torch's (the libgomp it loaded); where the compiler
has none (Apple's clang), threads of its own."""

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def _compiler() -> str | None:
    """``$CXX``, else g++ or clang++, where found."""
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def native_compiler_missing() -> str | None:
    """Why the C++ kernel cannot be built here, or None if it can."""
    if _compiler() is None:
        return "no C++ compiler found (g++ or clang++, or $CXX)"
    return None


def cache_dir() -> Path:
    """Where built variants are kept: ``$ADAN_CACHE_DIR``, else ``adan`` in the user's cache
    folder."""
    root = os.environ.get("ADAN_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adan"


def _folder() -> Path:
    """:func:`cache_dir`, or where it cannot be written (a read-only home), a folder of this
    user's in the temporary directory, private to them: in a folder anyone can write to,
    another user could leave a library of theirs under the name this one loads."""
    fallback = Path(tempfile.gettempdir()) / f"adan-{os.getuid() if hasattr(os, 'getuid') else 0}"
    for folder, private in ((cache_dir(), False), (fallback, True)):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK) and (not private or _private(folder)):
            return folder
    raise RuntimeError(f"no writable folder of this user's for the compiled kernel "
                       f"({cache_dir()}, {fallback})")


def _private(folder: Path) -> bool:
    """Whether ``folder`` is this user's and no one else may write to it."""
    if not hasattr(os, "getuid"):
        return True
    info = folder.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _code_defines(prefix: str, code: MxCode) -> list[str]:
    """One code's constants (:class:`adan.numeric.codes.MxCode`) as the source's macros."""
    values = dict(BIAS=code.bias, LOWEST=code.lowest, BUMP=code.bump, RESERVED=code.reserved,
                  NEAREST=code.nearest, NOISE_OFFSET=f"{code.noise_offset & 0xFFFFFFFF}u")
    return [f"-DADAN_{prefix}_{name}={value}" for name, value in values.items()]


def _variant(fmt: StateFormat, param: torch.dtype, grad: torch.dtype, buffer: torch.dtype
             ) -> tuple[int, int, int, int]:
    """The variant's codes: parameter, gradient, float buffer, format."""
    return (_CODES[param], _CODES[grad], _CODES[buffer] if fmt.triton_code == 0 else 0,
            fmt.triton_code)


@functools.cache
def _machine() -> str:
    """What the compiled code depends on besides the source and flags: the compiler's version
    and, for ``-march=native``, the processor's features."""
    compiler = _compiler()
    version = subprocess.run([compiler or "", "--version"], capture_output=True, text=True,
                             check=False).stdout
    features = ""
    try:
        features = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{compiler}\n{version}\n{features}"


def _compile(defines: list[str], path: Path) -> None:
    """Compile the source with ``defines`` into ``path``, atomically (another process sees all
    of the library or nothing)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(native_compiler_missing())
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        for extra in OPENMP:
            done = subprocess.run([compiler, *FLAGS, *extra, *defines, str(SOURCE), "-o",
                                   str(out)], capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
        os.replace(out, path)


@functools.cache
def build(variant: tuple[int, int, int, int]) -> Any:
    """The step function of one variant (:func:`_variant`), compiled unless in the cache."""
    names = ("P", "G", "B", "FMT")
    defines = [f"-DADAN_{n}={v}" for n, v in zip(names, variant, strict=True)]
    defines += _code_defines("S", SIGNED_CODE) + _code_defines("U", UNSIGNED_CODE)
    source = SOURCE.read_bytes()
    flags = " ".join((*FLAGS, *defines, repr(OPENMP)))
    digest = hashlib.sha256(b"\0".join([source, flags.encode(), _machine().encode()])
                            ).hexdigest()[:24]
    name = f"adan_native_{digest}.so"
    path = cache_dir() / name
    if not path.exists():
        path = _folder() / name
        if not path.exists():
            _compile(defines, path)
    library = ctypes.CDLL(str(path))
    expected = sum(v << (4 * i) for i, v in enumerate(variant))
    if library.adan_native_variant() != expected:
        raise RuntimeError(f"{path} holds another variant of the kernel")
    fn = library.adan_native_step
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 12 + [ctypes.c_int64] + [ctypes.c_int] * 3
    return fn


def _function(fmt: StateFormat, p: Tensor, g: Tensor, buffers: list[Tensor]) -> Any | None:
    """The built step for these real views, or None where it does not apply: a tensor that is
    not dense, a dtype the source has no type for, or float64 parameters (their eager step's
    square root is MKL's, not always correctly rounded, and the paths must agree)."""
    if not all(t.is_contiguous() for t in (p, g, *buffers)):
        return None
    if p.dtype not in _CODES or p.dtype == torch.float64 or g.dtype not in _CODES:
        return None
    if fmt.triton_code == 0 and buffers[0].dtype not in _CODES:
        return None
    return build(_variant(fmt, p.dtype, g.dtype, buffers[0].dtype))


@dataclass
class _Call:
    """One tensor's call, as far as it lasts between steps of a plan: the built step (None:
    the eager step), the real views and the addresses of what the step writes besides the
    gradient, which is a new tensor at most steps."""

    fn: Any | None
    p: Tensor
    buffers: list[Tensor]
    metas: list[Tensor | None]
    pointers: tuple[int, ...]
    dtype: torch.dtype
    rounds: bool


def _calls(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
           args: StepArgs) -> list[_Call]:
    """Every tensor's call, its variant built (if need be) before any tensor is written: a
    build that fails leaves the step undone rather than half done."""
    calls = []
    for param, grad, state in zip(params, grads, states, strict=True):
        p, g, buffers, metas = tensor_views(param, grad, state)
        pointers = (p.data_ptr(), *(b.data_ptr() for b in buffers),
                    *(0 if m is None else m.data_ptr() for m in metas))
        calls.append(_Call(_function(args.fmt, p, g, buffers), p, buffers, metas, pointers,
                           work_dtype(param), args.rounds_param(param.dtype)))
    return calls


def cpu_native_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one Adan step to every tensor in place, each in one call of its C++ variant (in
    the eager step where none applies). ``cache`` (the plan's) keeps the calls; its owner
    empties it when the tensors' dtypes, shapes or state change, and the parameters'
    addresses are checked here."""
    start = step_start(states, args)
    if start is None:
        return
    go, tensor_scalars, lr = start
    may_skip = go is not True
    addresses = list(map(Tensor.data_ptr, params))
    kept = None if cache is None else cache.get("native")
    if kept is None or kept[0] != addresses:
        kept = (addresses, _calls(params, grads, states, args))
        if cache is not None:
            cache["native"] = kept
    vectors: dict[tuple[Any, ...], Tensor] = {}
    threads = torch.get_num_threads()
    for call, grad, state in zip(kept[1], grads, states, strict=True):
        step: Scalar = state["step"] + 1 if tensor_scalars else state["step"].item() + 1
        s = step_vector(step, lr, args, call.dtype, grad.device, tensor_scalars, vectors)
        seed = seed_of(state)
        g = real_view(grad)
        if call.fn is None:
            tensor_step(call.p, g, call.buffers, call.metas, s, seed, args.fmt,
                        args.stochastic_param, may_skip)
        else:
            numel = call.p.numel()
            call.fn(call.pointers[0], g.data_ptr(), *call.pointers[1:], s.data_ptr(),
                    seed.data_ptr(), numel, call.rounds, may_skip,
                    threads if numel >= PARALLEL_MIN else 1)
    count_steps(states, go)
