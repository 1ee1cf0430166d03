"""Float tolerances derived from the dtype and the size of a reduction, not
from one machine's rounding: CPUs with other vector widths (AVX2, AVX-512)
add in another order and differ in the last bits."""
import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def summation_tolerance(dtype: torch.dtype, terms: int, total_magnitude: float = 1.0,
                        extra_operations: int = 4) -> float:
    """Worst-case error of a sum of `terms` numbers whose magnitudes add up
    to `total_magnitude`, in any order: (terms - 1) * u * total (the textbook
    bound for recursive summation), plus a few roundings per element before
    the sum (`extra_operations`, e.g. exp and a division in softmax)."""
    return (terms - 1 + extra_operations) * unit_roundoff(dtype) * total_magnitude
