"""Rounding error of 8-bit block codes: the power codes (``adan.numeric.codes``) vs minifloats.

    python benchmarks/code_formats.py [--blocks 4096] [--seed 0]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
