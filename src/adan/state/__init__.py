"""Layer 1, state: the storage formats (:mod:`.formats`), a parameter's state over its life
(:mod:`.lifecycle`), the change-counting state map (:mod:`.store`) and DTensor shards
(:mod:`.sharded`)."""

from adan.state.formats import BF16, FP32, INT8, PLAIN, StateFormat, storage_format
from adan.state.lifecycle import state_bytes

__all__ = ["BF16", "FP32", "INT8", "PLAIN", "StateFormat", "state_bytes", "storage_format"]
