"""Stage ``convert``: DICOM tree + RLE csv -> processed PNG images/masks, manifest, failures
(see :mod:`pneumoseg.conversion`). The stage fails only when the failed fraction exceeds
``data.max_failed_fraction``."""

from __future__ import annotations

from pneumoseg.conversion import ConvertError, ConvertSummary, convert
from pneumoseg.params import Params


def run(params: Params, progress: bool = True, id_map: str | None = None) -> ConvertSummary:
    """CLI/DVC entry: convert with ``params.data``; raise if too many files failed.
    ``id_map``: with ``data.pseudonymize_ids``, write the ImageId -> pseudonym table there."""
    data = params.data
    summary = convert(
        raw_dir=data.raw_dir,
        out_dir=data.processed_dir,
        size=data.size,
        rle_csv=data.rle_csv,
        dialect=data.rle_dialect,
        workers=data.workers,
        file_timeout=data.file_timeout,
        clahe=data.clahe,
        sample_submission=data.sample_submission,
        progress=progress,
        pseudonymize=data.pseudonymize_ids,
        id_map=id_map if data.pseudonymize_ids else None,
    )
    print(summary.line())
    if summary.failed_fraction > data.max_failed_fraction:
        raise ConvertError(
            f"{summary.failed_fraction:.1%} of files failed, more than "
            f"data.max_failed_fraction={data.max_failed_fraction:.1%} (see {summary.failures})"
        )
    return summary
