"""Which kernel steps which tensors: one table from (device, format, the user's choice).

The choice reads the group's flags as torch's optimizers do: ``fused=True`` the device's fused
kernel or an error, ``fused=False`` never a fused kernel, ``foreach=True`` the multi-tensor
eager path (compact state, which has none, takes its own eager path), ``foreach=False`` the
single-tensor path, neither set the fastest. A fused kernel is built and probed on scratch
tensors, its results checked against float64 on the host (:mod:`.verify`), in a background
thread while the eager path steps (``fused=True`` waits for it); a failed build or check falls
back with one warning, or raises under ``fused=True`` (docs/architecture.md).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import BUILDING, Kernel, traced
from adan.kernels.compact import compact_adan
from adan.kernels.cpu_compiled import SERIAL_MAX, cpu_compiled_adan, cpu_compiler_missing
from adan.kernels.cpu_native import PARALLEL_MIN, cpu_native_adan, native_compiler_missing
from adan.kernels.foreach import multi_tensor_adan
from adan.kernels.single import single_tensor_adan
from adan.kernels.verify import Variant, capture_error, capturing, self_check
from adan.numeric.scalars import real_view
from adan.state.formats import PLAIN, StateFormat

__all__ = ["FUSED_MIN_NUMEL", "TABLE", "Route", "choice", "kernel_name", "route"]

FUSED_MIN_NUMEL = 1 << 16
"""By default a CPU tensor of plain state takes the compiled kernel from this many elements
and the multi-tensor path below (docs/benchmarks.md, benchmarks/fused_cutoff.py)."""

Route = list[tuple[Kernel, list[int]]]

# (device type, compact state?, choice) -> kernel name; "*" matches any device. "cpu-default"
# sends each tensor by its size; the fused names fall back to their eager twin. Compact state
# on the CPU takes the hand-written C++ kernel (cpu_native.cpp), which steps it 5-16x faster
# than Inductor's code for the same step (docs/lowmem.md, "Speed").
TABLE: dict[tuple[str, bool, str], str] = {
    ("cuda", False, "default"): "triton",
    ("cuda", True, "default"): "triton",
    ("cpu", False, "default"): "cpu-default",
    ("cpu", True, "default"): "cpu-native",
    ("*", False, "default"): "foreach",
    ("*", True, "default"): "compact",
    ("cuda", False, "fused"): "triton",
    ("cuda", True, "fused"): "triton",
    ("cpu", False, "fused"): "cpu-compiled",
    ("cpu", True, "fused"): "cpu-native",
    ("*", False, "eager"): "foreach",
    ("*", True, "eager"): "compact",
    ("*", False, "foreach"): "foreach",
    ("*", True, "foreach"): "compact",
    ("*", False, "single"): "single",
    ("*", True, "single"): "compact",
}

_EAGER: dict[str, Kernel] = {"foreach": multi_tensor_adan, "compact": compact_adan,
                             "single": single_tensor_adan}
_FUSED_KIND = {"triton": "triton", "cpu-compiled": "cpu", "cpu-default": "cpu",
               "cpu-native": "native"}

BACKGROUND = True
"""Build fused kernels off the critical path (tests may turn it off)."""
PREWARM = True
"""Compile a CPU kernel in a subprocess first, which fills the on-disk compile cache without
sharing this process's GIL; the build in this process then loads from that cache."""
WAIT_NOTICE_S = 1.0
"""A wait for a build longer than this says so on stderr."""


@dataclass
class _Build:
    """One fused kernel variant's build and probe: done once it ran or failed."""

    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    compiling: bool = False  # in this process (an exit waits for that part)


# Builds per (kind, device type, format, dtypes, options), started or finished; and a count
# of the background builds finished, which the plans' keys read (a plan routed around a build
# is re-made once it is done).
_builds: dict[tuple[Any, ...], _Build] = {}
_finished = [0]
_exiting = [False]
_lock = threading.Lock()
_children: set[subprocess.Popen[bytes]] = set()

_PREWARM = """
import json, os, sys
os.nice(19)  # compile on idle cores: the training process's threads go first
import torch
from adan.kernels import routing
from adan.state.formats import FORMATS
fmt, dtypes, options, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
with torch.no_grad():
    routing._probe("cpu", torch.device("cpu"), FORMATS[fmt],
                   *(getattr(torch, d) for d in dtypes), options)
"""


def builds_finished() -> int:
    """How many background builds have finished (plans made before may route otherwise)."""
    return _finished[0]


@atexit.register
def _finish_builds() -> None:
    """At exit, stop the subprocesses that fill the compile cache and let a build already
    compiling in this process finish: a compile cut off by the interpreter's shutdown can
    abort the process ("terminate called without an active exception")."""
    with _lock:
        _exiting[0] = True
    for child in list(_children):
        try:  # its process group: the compiler processes it started too
            os.killpg(child.pid, signal.SIGKILL)
        except (AttributeError, OSError):
            child.kill()
        child.wait()
    running = [b for b in list(_builds.values()) if b.compiling and not b.done.is_set()]
    if running:
        print("adan: finishing a fused kernel's build before exiting", file=sys.stderr,
              flush=True)
    for build in running:
        build.done.wait()


def choice(group: dict[str, Any]) -> str:
    """The user's choice of implementation, as the table names it."""
    if group["fused"]:
        return "fused"
    if group["foreach"]:
        return "foreach"
    if group["foreach"] is False:
        return "single"
    return "eager" if group["fused"] is False else "default"


def kernel_name(device: str, compact: bool, how: str) -> str | None:
    """The table's entry for a device type, compact state or not, and a :func:`choice`
    (None: no such kernel, e.g. ``fused=True`` for another device)."""
    return TABLE.get((device, compact, how)) or TABLE.get(("*", compact, how))


def _triton_module() -> Any:
    """:mod:`adan.kernels.triton`, imported on first use (it needs Triton)."""
    from adan.kernels import triton

    return triton


def _fused_kernel(kind: str) -> Kernel:
    if kind == "native":
        return cpu_native_adan
    return cpu_compiled_adan if kind == "cpu" else _triton_module().triton_adan


def _probe(kind: str, device: torch.device, fmt: StateFormat, dtype: torch.dtype,
           grad_dtype: torch.dtype, options: dict[str, Any]) -> None:
    """Build and self-check (:mod:`.verify`) on scratch tensors (no user tensor is touched)
    the variants a group with these options steps with: for Inductor's CPU kernel the serial
    and the threaded one as its sizes need; for the C++ kernel a partial 8-bit block, a tensor
    split over threads and a misaligned one; for Triton full and partial tiles, aligned and
    misaligned (each a kernel of its own)."""
    if kind == "cpu":
        sizes, misaligned = [300] * options["serial"] + [SERIAL_MAX] * options["parallel"], []
    elif kind == "native":
        sizes, misaligned = [300, PARALLEL_MIN + 37], [45]
    else:
        block = _triton_module().BLOCK
        sizes, misaligned = [block + 5, 7], [block + 300]
    self_check(_fused_kernel(kind), Variant(kind, device, fmt, dtype, grad_dtype, options), sizes,
               misaligned)


def _unavailable(kind: str) -> str | None:
    if kind == "cpu":
        return cpu_compiler_missing()
    if kind == "native":
        return native_compiler_missing()
    try:
        _triton_module()
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    return None


def _options(kind: str, group: dict[str, Any], params: list[Tensor]) -> dict[str, Any]:
    """What selects the variants these tensors step with, besides dtypes and format."""
    common = dict(factor=group["max_grad_norm"] > 0,
                  stochastic_param=group["stochastic_param_rounding"])
    if kind == "cpu":
        serial = [real_view(p).numel() < SERIAL_MAX for p in params]
        return dict(common, serial=any(serial), parallel=not all(serial))
    if kind == "native":
        return common
    return dict(common, no_prox=group["no_prox"], maximize=group["maximize"],
                tensor_lr=isinstance(group["lr"], Tensor))


def _run_build(build: _Build, kind: str, device: torch.device, fmt: StateFormat,
               dtypes: tuple[torch.dtype, torch.dtype], options: dict[str, Any],
               background: bool, threads: int) -> None:
    """Build and probe; in a thread of its own, under the step's grad mode and thread count,
    which compiled code is specialised for."""
    try:
        reason = _unavailable(kind)
        if reason is not None:
            raise RuntimeError(reason)
        if background and PREWARM and kind == "cpu":
            _prewarm(fmt, dtypes, options, threads)
        with _lock:
            if _exiting[0]:
                build.error = RuntimeError("the process is exiting")
                return
            build.compiling = True
        if background:
            BUILDING.add(threading.get_ident())
            torch.set_num_threads(threads)
            _lower_priority()
        with torch.no_grad():
            _probe(kind, device, fmt, *dtypes, options)
    except Exception as exc:  # noqa: BLE001 - any build failure means "cannot fuse"
        build.error = exc
    finally:
        if background:
            _finished[0] += 1
            BUILDING.discard(threading.get_ident())
        build.done.set()


def _lower_priority() -> None:
    """Let this (build) thread, and the compile workers it starts, yield the cores to the
    training threads (Linux: a thread's own nice value; elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _prewarm(fmt: StateFormat, dtypes: tuple[torch.dtype, torch.dtype],
             options: dict[str, Any], threads: int) -> None:
    """Compile the CPU kernel's variants in a subprocess (the same code, thread count and
    cache folder); its failure is left for the build in this process to report."""
    spec = json.dumps([fmt.name, [str(d).removeprefix("torch.") for d in dtypes], options,
                       threads])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _PREWARM, spec], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    _children.add(child)
    try:
        child.wait()
    finally:
        _children.discard(child)


PENDING = RuntimeError("the fused kernel is still being built")
"""What :func:`build_error` returns for a build not finished yet."""


def build_error(kind: str, device: torch.device, fmt: StateFormat, params: list[Tensor],
                grads: list[Tensor], options: dict[str, Any], wait: bool = True
                ) -> BaseException | None:
    """Build fused kernel ``kind`` ("cpu", "native" or "triton") for these tensors and a group's
    options, once per process: None when it runs, the error that stopped it, or, without
    ``wait``, :data:`PENDING` while a build started in the background is not done."""
    pending = False
    for dtypes in dict.fromkeys((real_view(p).dtype, real_view(g).dtype)
                                for p, g in zip(params, grads, strict=True)):
        key = (kind, device.type, fmt, *dtypes, *sorted(options.items()))
        build = _builds.get(key)
        if build is None and (refused := capture_error(kind)) is not None:
            _finished[0] += 1  # re-plan at the next step, which may build it
            return refused
        if build is None:
            build = _builds[key] = _Build()
            args = (build, kind, device, fmt, dtypes, options, BACKGROUND,
                    torch.get_num_threads())
            if BACKGROUND:
                threading.Thread(target=_run_build, args=args, name="adan-build",
                                 daemon=True).start()
            else:
                _run_build(*args)
        if not build.done.is_set():
            if not wait:
                pending = True
                continue
            if not build.done.wait(WAIT_NOTICE_S):
                print(f"adan: waiting for the fused kernel ({kind}, {fmt}, {dtypes[0]}) to "
                      "be built", file=sys.stderr, flush=True)
                build.done.wait()
        if build.error is not None:
            return build.error
    return PENDING if pending else None


def _fused(kind: str, fallback: Kernel, must: bool, wait: bool, taken: list[int],
           everything: list[int], params: list[Tensor], grads: list[Tensor],
           states: list[dict[str, Any] | None], fmt: StateFormat, group: dict[str, Any]
           ) -> Route:
    """Fused kernel ``kind`` for the positions ``taken`` once it is built, ``fallback`` for
    the others, or for all while it is being built or where it cannot be."""
    if kind == "triton":
        unsupported = _triton_module().triton_unsupported
        taken = [i for i in taken if unsupported(params[i], grads[i], states[i]) is None]
    wait = wait or must or (kind == "triton" and (  # a graph captures a kernel that is ready
        group["capturable"] or capturing()))
    chosen = [params[i] for i in taken]
    error = build_error(kind, params[0].device, fmt, chosen, [grads[i] for i in taken],
                        _options(kind, group, chosen), wait) if taken else None
    rest = [i for i in everything if i not in set(taken)]
    if error is PENDING:  # meanwhile the eager twin of the fused kernels: the same bits
        return [(compact_adan, taken)] + ([(fallback, rest)] if rest else [])
    if error is not None:
        if must:
            raise RuntimeError(f"fused=True cannot run here: {error}") from error
        if not getattr(error, "_adan_warned", False):
            error._adan_warned = True  # type: ignore[attr-defined]
            warnings.warn(f"adan: the fused kernel is unavailable ({error}); using the "
                          "eager implementation instead", RuntimeWarning, stacklevel=6)
        return [(fallback, everything)]
    return ([(_fused_kernel(kind), taken)] if taken else []) + (
        [(fallback, rest)] if rest else [])


def route(group: dict[str, Any], fmt: StateFormat, params: list[Tensor], grads: list[Tensor],
          states: list[dict[str, Any] | None], wait: bool = False) -> Route:
    """The kernels for one device's parameters of one storage format in one param group, each
    with the positions of the parameters it updates. Each tensor's route depends on it alone,
    so a part of a group (gradient release) is routed as the whole group would route it.
    ``wait``: for a fused kernel still being built (else the eager path steps meanwhile)."""
    everything = list(range(len(params)))
    compact = fmt is not PLAIN or bool(group["stochastic_param_rounding"])
    if group["differentiable"] or torch.jit.is_scripting():
        return [(single_tensor_adan, everything)]
    how = choice(group)
    if traced():  # Dynamo traces the eager paths
        how = "single" if how == "single" else "foreach"
    elif how in ("default", "eager") and not all(
            type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params):
        how = "single"  # tensor subclasses
    device = params[0].device.type
    name = kernel_name(device, compact, how)
    if name is None:
        raise RuntimeError(f"fused=True cannot run here: there is a fused kernel for CPU and "
                           f"CUDA parameters, not for {device}")
    if name in _EAGER:
        return [(_EAGER[name], everything)]
    fallback = _EAGER["compact" if compact else "foreach"]
    taken = everything
    if name == "cpu-default":
        taken = [i for i in everything
                 if real_view(params[i]).numel() >= FUSED_MIN_NUMEL]
        if not taken:
            return [(fallback, everything)]
    return _fused(_FUSED_KIND[name], fallback, how == "fused", wait, taken, everything, params,
                  grads, states, fmt, group)
