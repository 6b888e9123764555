"""Storage formats of Adan's four state buffers: one type per format (docs/lowmem.md).

A format knows its buffers' dtypes and shapes, how to create them, how a kernel decodes and
encodes them, how to convert state from another format, and its code in the Triton kernel.
Adding a format is one subclass here and its branch in the kernels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from adan.numeric.codes import (
    MX_BLOCK,
    dequantize_blockwise,
    mx2_decode,
    mx_blocks,
    mx_code,
    mx_decode,
    mx_decode_rows,
    mx_encode,
    mx_encode_rows,
    mx_noise,
    mx_rows,
    round_to_bf16,
)
from adan.numeric.scalars import real_view
from adan.state.dtensor import local

__all__ = ["BF16", "BLOCK_SUFFIXES", "BUFFERS", "BUFFER_KEYS", "CODES_KEY", "FORMATS", "FP32",
           "INT8", "MX2_CODES", "MX_CODES", "PLAIN", "StateFormat", "decode",
           "normalize_state_dtype", "storage_format", "work_dtype"]

BUFFERS = (("exp_avg", True), ("exp_avg_diff", True), ("exp_avg_sq", False), ("prev_grad", True))
"""(state key, signed code?) of the four buffers, in the order every kernel uses them."""
BUFFER_KEYS = tuple(key for key, _ in BUFFERS)

CODES_KEY = "int8_codes"
"""The per-parameter state entry (an int, as torch's state dict tools keep it) naming the
version of the 8-bit codes its buffers hold; state without it holds the power codes of
before (version 1) if it has ``<buffer>_meta`` tensors."""
MX_CODES = 3
"""Version 3: the 8-bit block codes (:mod:`adan.numeric.codes`: FP8 E4M3 and n's e5m3),
``<buffer>_exp`` scales."""
MX2_CODES = 2
"""Version 2: the minifloats of before (two's complement e4m3 and e5m3, decoded only)."""
BLOCK_SUFFIXES = ("_exp", "_meta")
"""Suffixes of the block data beside 8-bit buffers: the codes' scales, the old power
codes' meta rows (loaded only)."""


class StateFormat:
    """How the four buffers of one parameter's state are stored (the float formats)."""

    name: ClassVar[str]
    triton_code: ClassVar[int] = 0
    """The Triton kernel's ``FMT``: 0 float buffers, 1 bfloat16 rounded stochastically,
    2 8-bit codes."""
    rounds: ClassVar[bool] = False
    """Re-encoded with stochastic rounding after every step (the compact formats)."""
    quantized: ClassVar[bool] = False
    """Buffers are codes with a ``<buffer>_exp`` tensor of block scales beside each."""
    records: ClassVar[dict[str, int]] = {}
    """Entries a state in this format keeps beside its buffers (which codes they hold)."""
    noise_words: ClassVar[int] = 0
    """32-bit noise words per element that a step's rounding of the buffers takes."""

    def __repr__(self) -> str:
        return self.name

    def buffer_dtype(self, param: Tensor, signed: bool) -> torch.dtype:
        raise NotImplementedError

    def buffer_shape(self, param: Tensor) -> tuple[int, ...]:
        """Buffers are shaped like the parameter's real view."""
        return tuple(real_view(param).shape)

    def new_buffers(self, param: Tensor) -> dict[str, Tensor]:
        """The four buffers (and their block data), zeroed, on the parameter's device."""
        return {key: torch.zeros(self.buffer_shape(param), dtype=self.buffer_dtype(param, signed),
                                 device=param.device) for key, signed in BUFFERS}

    def matches(self, state: dict[str, Any], param: Tensor) -> bool:
        """Whether ``state``'s buffers are all stored as this format stores them for ``param``
        (8-bit codes are checked on the local shard of a DTensor parameter)."""
        if self.quantized:
            param = local(param)
        for key, signed in BUFFERS:
            buffer = state.get(key)
            if (not isinstance(buffer, Tensor) or self.quantized != (key + "_exp" in state)
                    or key + "_meta" in state or buffer.dtype != self.buffer_dtype(param, signed)
                    or tuple(buffer.shape) != self.buffer_shape(param)):
                return False
        return not self.quantized or state.get(CODES_KEY) == MX_CODES

    def encode(self, value: Tensor, param: Tensor, signed: bool) -> dict[str, Tensor]:
        """A buffer's entries holding ``value`` (shaped like the real view), rounded to
        nearest: what conversion into this format stores."""
        return {"": value.to(self.buffer_dtype(param, signed)).reshape(self.buffer_shape(param))}

    def load(self, buffer: Tensor, meta: Tensor | None, shape: torch.Size, signed: bool,
             dtype: torch.dtype) -> Tensor:
        """A kernel's decoded ``dtype`` view of one buffer (a real view)."""
        return buffer.to(dtype).view(shape)

    def noise(self, words: list[Tensor], index: int) -> Tensor | None:
        """Buffer ``index``'s rounding noise from the step's :attr:`noise_words` (int32), or
        None to round to nearest."""
        return None

    def store(self, buffer: Tensor, meta: Tensor | None, x: Tensor, signed: bool,
              noise: Tensor | None, go: Tensor | None) -> None:
        """Encode a step's ``x`` into ``buffer`` (``noise`` from :meth:`noise`); where ``go``
        is false the old contents are kept."""
        new = x.view(buffer.shape)
        buffer.copy_(new if go is None else torch.where(go, new.to(buffer.dtype), buffer))

    def store_error(self, x: Tensor, param: Tensor, signed: bool) -> Tensor:
        """A bound per element on how far a stored and decoded ``x`` (flat, float64) may be
        from ``x``, rounded to nearest or stochastically: one unit in the last place of the
        buffer's dtype (the first-use self-check, :mod:`adan.kernels.verify`, allows it)."""
        info = torch.finfo(self.buffer_dtype(real_view(param), signed))
        return x.abs() * info.eps + info.tiny


class _Plain(StateFormat):
    """The parameter's own dtype and layout (complex parameters keep complex buffers)."""

    name = "plain"

    def buffer_dtype(self, param: Tensor, signed: bool) -> torch.dtype:
        return param.dtype

    def buffer_shape(self, param: Tensor) -> tuple[int, ...]:
        return tuple(param.shape)

    def new_buffers(self, param: Tensor) -> dict[str, Tensor]:
        return {key: torch.zeros_like(param, memory_format=torch.preserve_format)
                for key in BUFFER_KEYS}

    def encode(self, value: Tensor, param: Tensor, signed: bool) -> dict[str, Tensor]:
        if torch.is_complex(param):
            return {"": torch.view_as_complex(value.to(real_view(param).dtype).contiguous())}
        return super().encode(value, param, signed)


class _Float32(StateFormat):
    """float32 buffers for a parameter of another dtype (bf16, fp16 or fp64)."""

    name = "fp32"

    def buffer_dtype(self, param: Tensor, signed: bool) -> torch.dtype:
        return torch.float32


class _BFloat16(StateFormat):
    """bfloat16 buffers, re-encoded with stochastic rounding after every step."""

    name = "bf16"
    triton_code = 1
    rounds = True
    noise_words = 2

    def buffer_dtype(self, param: Tensor, signed: bool) -> torch.dtype:
        return torch.bfloat16

    def noise(self, words: list[Tensor], index: int) -> Tensor | None:
        """16 random bits per buffer: the low and high halves of the two words."""
        word = words[index // 2]
        return (word >> 16 if index % 2 else word & 0xFFFF).to(torch.int32)

    def store(self, buffer: Tensor, meta: Tensor | None, x: Tensor, signed: bool,
              noise: Tensor | None, go: Tensor | None) -> None:
        super().store(buffer, meta, round_to_bf16(x, noise), signed, noise, go)


class _Int8(StateFormat):
    """8-bit block codes (:mod:`adan.numeric.codes`) shaped like the real view, with a
    flat uint8 ``<buffer>_exp`` of one scale per block of 32 and the ``codes`` record."""

    name = "int8"
    triton_code = 2
    rounds = True
    quantized = True
    records = {CODES_KEY: MX_CODES}
    noise_words = 1
    tolerance: ClassVar[float] = 1 / 8
    """The largest gap between neighbouring codes relative to the value rounded (3 mantissa
    bits), in the normal range: a bound on an element's coding error, nearest or stochastic."""

    def buffer_dtype(self, param: Tensor, signed: bool) -> torch.dtype:
        return torch.int8 if signed else torch.uint8

    def new_buffers(self, param: Tensor) -> dict[str, Tensor]:
        state = super().new_buffers(param)
        rows = mx_blocks(real_view(param).numel())
        for key in BUFFER_KEYS:
            state[key + "_exp"] = torch.full((rows,), mx_code(False).lowest, dtype=torch.uint8,
                                             device=param.device)
        return state

    def encode(self, value: Tensor, param: Tensor, signed: bool) -> dict[str, Tensor]:
        codes, scales = mx_encode(value.float(), signed)
        return {"": codes.view(value.shape), "_exp": scales}

    def load(self, buffer: Tensor, meta: Tensor | None, shape: torch.Size, signed: bool,
             dtype: torch.dtype) -> Tensor:
        assert meta is not None
        return mx_decode(buffer, meta, shape, signed=signed, dtype=dtype)

    def noise(self, words: list[Tensor], index: int) -> Tensor | None:
        return mx_noise(words[0], index)

    def load_rows(self, buffer: Tensor, scales: Tensor, signed: bool) -> Tensor:
        """A kernel's float32 view of one buffer as blocks (``adan.numeric.codes.mx_rows``):
        with every operand in that shape a compiled step is one loop over the blocks."""
        return mx_decode_rows(buffer, scales, signed)

    def store_rows(self, buffer: Tensor, scales: Tensor, x: Tensor, signed: bool,
                   noise: Tensor | None, go: Tensor | None) -> None:
        """:meth:`store` of ``x`` and ``noise`` given as blocks."""
        codes, new = mx_encode_rows(x.float(), signed, noise)
        self._write(buffer, scales, codes.reshape(-1)[: buffer.numel()], new, go)

    def store_error(self, x: Tensor, param: Tensor, signed: bool) -> Tensor:
        """:attr:`tolerance` times the value, plus the fixed error below the normal codes
        (``MxCode.floor`` times the block's scale, over which its largest finite magnitude
        is at least half the top code's value), plus float32 rounding."""
        code = mx_code(signed)
        mag = x.abs().float().reshape(-1)
        top = mx_rows(torch.where(torch.isfinite(mag), mag, 0.0)).amax(dim=1, keepdim=True)
        floor = (top * (2 * code.floor / code.largest)).expand(-1, MX_BLOCK)
        info = torch.finfo(torch.float32)
        bound = mag * (self.tolerance + info.eps) + floor.reshape(-1)[: mag.numel()] + info.tiny
        return bound.view(x.shape)

    def store(self, buffer: Tensor, meta: Tensor | None, x: Tensor, signed: bool,
              noise: Tensor | None, go: Tensor | None) -> None:
        assert meta is not None
        self._write(buffer, meta, *mx_encode(x, signed, noise), go)

    @staticmethod
    def _write(buffer: Tensor, scales: Tensor, codes: Tensor, new: Tensor,
               go: Tensor | None) -> None:
        codes, new = codes.view(buffer.shape), new[: scales.numel()]
        if go is not None:
            codes, new = torch.where(go, codes, buffer), torch.where(go, new, scales)
        buffer.copy_(codes)
        scales.copy_(new)


PLAIN, FP32, BF16, INT8 = _Plain(), _Float32(), _BFloat16(), _Int8()
FORMATS = {fmt.name: fmt for fmt in (PLAIN, FP32, BF16, INT8)}
"""Every format by its name."""

_ALIASES: dict[Any, str | None] = {
    None: None, "param": "param",
    "fp32": "fp32", "float32": "fp32", torch.float32: "fp32",
    "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
    "int8": "int8", torch.int8: "int8",
}
_STATE_DTYPE_HELP = (
    "allowed: None (the parameter's dtype; bf16 rounded stochastically for bf16 parameters, "
    "float32 for float16 ones), 'param' (the parameter's dtype rounded to nearest), 'fp32', "
    "'bf16', 'int8' (or torch.float32, torch.bfloat16, torch.int8)"
)


def normalize_state_dtype(value: Any, where: str = "") -> str | None:
    """Map a user's ``state_dtype`` to None, ``"param"``, ``"fp32"``, ``"bf16"`` or ``"int8"``,
    or raise (``where``, e.g. " in param group 1", is added to the message)."""
    try:
        return _ALIASES[value]
    except (KeyError, TypeError):
        hint = ""
        if value in ("fp16", "float16", torch.float16):
            hint = ("; float16 cannot hold Adan's second moment (it underflows for gradients "
                    "near 1e-3), so it is not offered")
        raise ValueError(f"Invalid state_dtype{where}: {value!r} ({_STATE_DTYPE_HELP}){hint}"
                         ) from None


def storage_format(param: Tensor, state_dtype: str | None) -> StateFormat:
    """The format of ``param``'s state for a group's (normalised) ``state_dtype``. None keeps
    the parameter's dtype, rounding bfloat16 stochastically (rounded to nearest, Adan's slow
    averages stop moving) and float16 as float32 (it cannot hold ``n``: squares of small
    gradients underflow, and so does ``eps``); ``"param"`` rounds bfloat16 to nearest."""
    dtype = real_view(param).dtype
    if state_dtype in (None, "param"):
        if dtype == torch.float16:
            return FP32
        return BF16 if dtype == torch.bfloat16 and state_dtype is None else PLAIN
    if state_dtype == "fp32":
        return PLAIN if dtype == torch.float32 else FP32
    return BF16 if state_dtype == "bf16" else INT8


def work_dtype(param: Tensor) -> torch.dtype:
    """The dtype updates are computed in: float32, or float64 for float64 parameters."""
    return torch.promote_types(real_view(param).dtype, torch.float32)


def decode(state: dict[str, Any], key: str, signed: bool, param: Tensor,
           dtype: torch.dtype) -> Tensor:
    """Buffer ``key`` of ``state``, in whatever format it is stored, as a ``dtype`` tensor
    shaped like ``param``'s real view."""
    shape = real_view(param).shape
    scales = state.get(key + "_exp")
    if scales is not None:
        if state.get(CODES_KEY) == MX2_CODES:
            return mx2_decode(state[key], scales, shape, signed=signed, dtype=dtype)
        return INT8.load(state[key], scales, shape, signed, dtype)
    meta = state.get(key + "_meta")
    if meta is not None:  # the power codes of before
        return dequantize_blockwise(state[key], meta, shape, signed=signed, dtype=dtype)
    return real_view(state[key]).to(dtype).reshape(shape)
