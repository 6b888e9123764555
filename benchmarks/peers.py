"""Other libraries' Adan classes, loaded only when installed, for side-by-side checks."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "SAIL_SG_FOLDER", "find_peers_dir", "load_peer", "load_sail_sg_adan",
           "load_timm_adan"]

# The folder, inside a peers directory, that holds sail-sg's reference ``adan.py`` and the
# sources of its CUDA extension ``fused_adan`` (built in place with ``setup.py build_ext``).
SAIL_SG_FOLDER = "sail-sg-adan"
# Its module name here: theirs is ``adan``, which would shadow this package.
_SAIL_SG_MODULE = "_sail_sg_adan"


def load_timm_adan() -> type | None:
    """timm's Adan from its file, without importing timm (which would import torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    optim_dir = Path(spec.submodule_search_locations[0]) / "optim"
    package = types.ModuleType("_timm_optim")
    package.__path__ = [str(optim_dir)]
    sys.modules["_timm_optim"] = package
    for name in ("_helpers", "adan"):
        file_spec = importlib.util.spec_from_file_location(f"_timm_optim.{name}",
                                                           optim_dir / f"{name}.py")
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[file_spec.name] = module
        file_spec.loader.exec_module(module)
    return sys.modules["_timm_optim.adan"].Adan  # type: ignore[no-any-return]


def load_peer(module: str, attr: str) -> type | None:
    """``module.attr`` when ``module`` is installed, else None."""
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def find_peers_dir(path: str | Path | None = None) -> Path | None:
    """The directory of peer copies: ``path`` when given (existing or not), else ``.peers`` in
    the current directory, else ``../shared/peers``; None when neither exists."""
    if path is not None:
        return Path(path)
    for candidate in (Path(".peers"), Path("..") / "shared" / "peers"):
        if candidate.is_dir():
            return candidate
    return None


def load_sail_sg_adan(peers_dir: Path | None) -> tuple[type, str | None]:
    """sail-sg's Adan from ``peers_dir/sail-sg-adan/adan.py`` and why its fused CUDA kernels
    cannot run (None when the extension ``fused_adan`` imports).

    The file is loaded by path as module ``_sail_sg_adan``. Its folder is on ``sys.path`` only
    while loading, where ``fused_adan`` (built in place) is imported once; the class's later
    ``import fused_adan`` then finds it in ``sys.modules``. Raises FileNotFoundError when the
    file is absent.
    """
    if peers_dir is None:
        raise FileNotFoundError("no peers directory (.peers or ../shared/peers)")
    folder = (peers_dir / SAIL_SG_FOLDER).resolve()
    path = folder / "adan.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    added = str(folder) not in sys.path
    if added:
        sys.path.append(str(folder))
    try:
        spec = importlib.util.spec_from_file_location(_SAIL_SG_MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_SAIL_SG_MODULE] = module
        spec.loader.exec_module(module)
        try:
            importlib.import_module("fused_adan")
            missing = None
        except Exception as exc:  # noqa: BLE001 - any failure means the fused rows cannot run
            missing = (f"extension fused_adan not importable from {folder} ({exc}); build it "
                       f"there with `python3 setup.py build_ext --inplace`")
    finally:
        if added:
            sys.path.remove(str(folder))
    return module.Adan, missing


# (name, loader, constructor arguments that align the peer's defaults with ours)
PEERS: list[tuple[str, Callable[[], type | None], dict[str, Any]]] = [
    ("timm Adan (foreach)", load_timm_adan, {"foreach": True}),
    ("pytorch-optimizer Adan", lambda: load_peer("pytorch_optimizer", "Adan"), {}),
    ("torch-optimi Adan", lambda: load_peer("optimi", "Adan"), {"eps": 1e-8}),
]
