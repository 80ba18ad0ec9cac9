"""Stage ``arrays``: the processed training PNGs as uint8 arrays at every training size,
decoded once, read by training without PNG decoding (see :mod:`pneumoseg.arrays`)."""

from __future__ import annotations

from typing import Any

from pneumoseg.arrays import write_arrays
from pneumoseg.params import Params


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: write ``arrays.out_dir`` from ``data.processed_dir``."""
    summary = write_arrays(
        params.data.processed_dir, params.arrays.out_dir, params.arrays.sizes, progress
    )
    sizes = ", ".join(f"{s} px" for s in summary["sizes"])
    print(
        f"arrays: {summary['images']} training images at {sizes} in {params.arrays.out_dir} "
        f"({summary['bytes'] / 2**20:.1f} MiB)"
    )
    return summary
