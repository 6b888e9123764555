"""Rounding error of 8-bit block codes: the old power codes vs minifloats.

    python benchmarks/code_formats.py [--blocks 4096] [--seed 0]
    python benchmarks/code_formats.py --real [--steps 200]

``--real`` measures on real Adan state instead (the digits CNN of ``benchmarks/digits.py``
after ``--steps`` steps with float32 state): the relative RMS error of each buffer rounded to
nearest by the old power codes (256-blocks, top kept exactly), by block minifloats with a
power-of-two scale per block of 32, 64 or 128, and by the package's codes
(``adan.numeric.codes``), n's error in ``sqrt(n)``; it chose the 8-bit format's block size
and minifloats (docs/lowmem.md). Run from the repository root with ``PYTHONPATH=.``.

A minifloat's code can be chosen from the float's bits (a shift, an add, a clamp), which is
what an 8-bit kernel near 160 instructions per element would need; the power codes need a
root and exact comparisons. This measures, in float64 and for nearest rounding, what each
format costs in accuracy on blocks of 256 values as the optimizer's state holds them: each
block's largest magnitude kept exactly (the top) and the rest scaled by the largest of them.
Signed formats are measured on m-like values (Gaussian, Student-t with 3 degrees of freedom,
log-normal magnitudes with random signs), unsigned ones on n-like values (squares), whose
error is measured in ``sqrt(n)``, the quantity the update divides by. Prints the relative RMS
error, the median relative error and the share of non-zero values rounded to zero.
"""

from __future__ import annotations

import argparse

import torch


def power_grid(levels: int, power: int) -> torch.Tensor:
    """The values of the codes ``(k / levels) ** power``, k = 0..levels."""
    return (torch.arange(levels + 1, dtype=torch.float64) / levels) ** power


def minifloat_grid(exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """The values in [0, 1] of a minifloat with subnormals whose largest binade is [1, 2)."""
    top = 2**exponent_bits - 1
    steps = torch.arange(2**mantissa_bits, dtype=torch.float64) / 2**mantissa_bits
    values = [2.0 ** (1 - top) * steps]  # the subnormals, from 0
    values += [2.0 ** (e - top) * (1 + steps) for e in range(1, top + 1)]
    grid = torch.cat(values)
    return grid[grid <= 1]


def nearest(t: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Each value of ``t`` (in [0, 1]) rounded to the nearest value of ``grid``."""
    hi = torch.bucketize(t, grid).clamp(1, grid.numel() - 1)
    lo_v, hi_v = grid[hi - 1], grid[hi]
    return torch.where(t - lo_v <= hi_v - t, lo_v, hi_v)


def normalised(x: torch.Tensor) -> torch.Tensor:
    """Magnitudes of ``x`` (blocks as rows) over their block's scale, the top left out (0)."""
    mag = x.abs()
    top = mag.argmax(dim=1, keepdim=True)
    rest = mag.scatter(1, top, 0.0)
    return rest / rest.amax(dim=1, keepdim=True)


def row(name: str, t: torch.Tensor, q: torch.Tensor, root: bool) -> str:
    """One line of figures for codes ``q`` of ``t`` (both in ``sqrt`` first when ``root``)."""
    nonzero = t > 0
    flushed = (q[nonzero] == 0).double().mean().item()
    if root:
        t, q = t.sqrt(), q.sqrt()
    rms = ((q - t).pow(2).mean() / t.pow(2).mean()).sqrt().item()
    median = ((q - t).abs()[nonzero] / t[nonzero]).median().item()
    return f"| {name} | {rms:.4f} | {median:.4f} | {flushed:.1e} |"


def mx_grid(exponent_bits: int, mantissa_bits: int, top: int) -> torch.Tensor:
    """The magnitudes of codes 0..top of a minifloat whose top binade is [2, 4)."""
    steps = 2**mantissa_bits
    k = torch.arange(top + 1, dtype=torch.float64)
    exponent = (k // steps).clamp(min=1) + 1 - 2**exponent_bits
    mantissa = torch.where(k < steps, k / steps, 1 + (k % steps) / steps)
    return mantissa * 2.0**exponent


def mx_round(x: torch.Tensor, block: int, grid: torch.Tensor) -> torch.Tensor:
    """``x`` (flat, float64) rounded to nearest by block minifloats: per block a power of two
    2**e, the smallest with the block's largest magnitude / 2**e at most the top code."""
    pad = -x.numel() % block
    rows = torch.cat([x, x.new_zeros(pad)]).view(-1, block)
    top = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    e = torch.ceil(torch.log2(top / grid[-1]))
    e = e + (top / 2.0**e > grid[-1]).double() - (top / 2.0 ** (e - 1) <= grid[-1]).double()
    q = nearest(rows.abs() / 2.0**e, grid) * 2.0**e * rows.sign()
    return q.reshape(-1)[: x.numel()]


def power_round(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``x`` (flat, float64) rounded to nearest by the old power codes: 256-blocks, the top
    kept exactly and the rest scaled by their largest."""
    pad = -x.numel() % 256
    rows = torch.cat([x, x.new_zeros(pad)]).view(-1, 256)
    mag = rows.abs()
    top = mag.argmax(dim=1, keepdim=True)
    rest = mag.scatter(1, top, 0.0)
    scale = rest.amax(dim=1, keepdim=True).clamp(min=1e-300)
    q = (nearest(rest / scale, grid) * scale).scatter(1, top, mag.gather(1, top))
    return (q * rows.sign()).reshape(-1)[: x.numel()]


def package_round(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """``x`` (flat, float64) stored as the package's 8-bit codes (float32, to nearest) and
    decoded."""
    from adan.numeric.codes import mx_decode, mx_encode

    codes, scales = mx_encode(x.float(), signed)
    return mx_decode(codes, scales, x.shape, signed=signed, dtype=torch.float64)


def real_state(steps: int) -> dict[str, torch.Tensor]:
    """Adan's four buffers (flat, float64, all parameters) after ``steps`` steps of the
    digits CNN with float32 state."""
    from adan import Adan
    from benchmarks.digits import Digits, DigitsConfig, train_digits

    kept: list[Adan] = []

    def make(groups: list[dict]) -> Adan:
        kept.append(Adan(groups, lr=3e-3, weight_decay=0.02, state_dtype="fp32"))
        return kept[0]

    train_digits(make, DigitsConfig(max_iters=steps, eval_interval=steps), Digits.load())
    states = list(kept[0].state.values())
    return {key: torch.cat([s[key].reshape(-1).double() for s in states])
            for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")}


def real(steps: int) -> None:
    """Print the table of ``--real``."""
    buffers = real_state(steps)
    formats: dict[str, tuple[int, torch.Tensor, torch.Tensor] | None] = {
        "power codes, 256 + top": None}
    for block in (32, 64, 128):
        version = " (version 2)" if block == 32 else ""
        formats[f"e4m3 / e5m3, {block}{version}"] = (block, mx_grid(4, 3, 127),
                                                     mx_grid(5, 3, 254))
        formats[f"e3m4 / e5m3, {block}"] = (block, mx_grid(3, 4, 127), mx_grid(5, 3, 254))
    print("| format (signed / n, block) | " + " | ".join(buffers)
          + " | m / sqrt(n) | median, m / sqrt(n) |")
    print("|---" * (len(buffers) + 3) + "|")
    formats["**FP8 E4M3 / e5m3, 32 (version 3, adan.numeric.codes)**"] = None
    for name, spec in formats.items():
        errors, rounded = [], {}
        for key, x in buffers.items():
            signed = key != "exp_avg_sq"
            if name.startswith("**"):
                q = package_round(x, signed)
            elif spec is None:
                q = power_round(x, power_grid(127, 3) if signed else power_grid(255, 4))
            else:
                block, sgrid, ugrid = spec
                q = mx_round(x, block, sgrid if signed else ugrid)
            rounded[key] = q
            if not signed:
                x, q = x.sqrt(), q.sqrt()
            errors.append(((q - x).pow(2).sum() / x.pow(2).sum()).sqrt().item())
        # the update's direction, as Adan divides the moment by the root of the second
        exact = buffers["exp_avg"] / (buffers["exp_avg_sq"].sqrt() + 1e-8)
        update = rounded["exp_avg"] / (rounded["exp_avg_sq"].sqrt() + 1e-8)
        errors.append(((update - exact).pow(2).sum() / exact.pow(2).sum()).sqrt().item())
        nonzero = exact != 0
        errors.append(((update - exact).abs()[nonzero] / exact.abs()[nonzero]).median().item())
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="measure on real Adan state")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.real:
        real(args.steps)
        return
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.blocks, 256)

    def normal() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    student = torch.distributions.StudentT(3.0)
    torch.manual_seed(args.seed)
    signed = {"Gaussian": normal(), "Student-t 3": student.sample(shape).double(),
              "log-normal": normal().sign() * (2 * normal()).exp()}
    unsigned = {"Gaussian squared": normal() ** 2,
                "Student-t 3 squared": student.sample(shape).double() ** 2}
    signed_formats = {"power (k/127)^3": power_grid(127, 3), "E4M3": minifloat_grid(4, 3),
                      "E3M4": minifloat_grid(3, 4), "E5M2": minifloat_grid(5, 2)}
    unsigned_formats = {"power (k/255)^4": power_grid(255, 4), "E4M4": minifloat_grid(4, 4),
                        "E5M3": minifloat_grid(5, 3)}
    for title, data, formats, root in (("signed (m, v, previous gradient)", signed,
                                        signed_formats, False),
                                       ("unsigned (n), error in sqrt(n)", unsigned,
                                        unsigned_formats, True)):
        print(f"\n{title}\n\n| values / format | relative RMS error | median relative error "
              "| non-zero rounded to 0 |\n|---|---|---|---|")
        for name, x in data.items():
            t = normalised(x)
            for fmt, grid in formats.items():
                print(row(f"{name}, {fmt}", t, nearest(t, grid), root))


if __name__ == "__main__":
    main()
