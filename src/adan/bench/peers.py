"""Other libraries' Adan classes, loaded only when installed, for side-by-side checks."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "load_peer", "load_timm_adan"]


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


# (name, loader, constructor arguments that align the peer's defaults with ours)
PEERS: list[tuple[str, Callable[[], type | None], dict[str, Any]]] = [
    ("timm Adan (foreach)", load_timm_adan, {"foreach": True}),
    ("pytorch-optimizer Adan", lambda: load_peer("pytorch_optimizer", "Adan"), {}),
    ("torch-optimi Adan", lambda: load_peer("optimi", "Adan"), {"eps": 1e-8}),
]
