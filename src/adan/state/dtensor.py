"""The one test for a DTensor (a sharded parameter or buffer: FSDP2, tensor parallelism)."""

from __future__ import annotations

from typing import Any, TypeGuard

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor

    _DTENSOR: tuple[type, ...] = (DTensor,)
except ImportError:  # a torch build without torch.distributed: no DTensor can exist
    DTensor = Tensor  # type: ignore[misc,assignment]
    _DTENSOR = ()

__all__ = ["is_dtensor", "local"]


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor."""
    return isinstance(t, _DTENSOR)


def local(t: Any) -> Any:
    """A DTensor's local shard; anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t
