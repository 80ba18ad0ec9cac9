"""Stage ``demo``: the synthetic SIIM-like DICOM data set (see :mod:`pneumoseg.demo`)."""

from __future__ import annotations

from pneumoseg.params import Params


def run(params: Params, progress: bool = True) -> None:
    """CLI/DVC entry: generate ``params.demo`` and print a one-line summary."""
    from pneumoseg.demo.dataset import generate_demo

    summary = generate_demo(params.demo, progress=progress)
    print(
        f"demo: {summary['train']} train ({summary['positive_train']} with pneumothorax) + "
        f"{summary['test']} test DICOMs in {summary['out_dir']} "
        f"({summary['bytes'] / 1e6:.1f} MB, {len(summary['transfer_syntaxes'])} transfer "
        f"syntaxes, {summary['seconds']:.1f}s)"
    )
