"""The ``pneumoseg`` command line: one subcommand per pipeline step.

Defaults come from ``params.yaml`` (validated); flags override single keys. Heavy libraries
(torch, mlflow) are imported only inside the subcommand that needs them, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

# subcommand -> (stage module, help, [(flag, params key, type, help)])
Flag = tuple[str, str, Any, str]
COMMANDS: dict[str, tuple[str, str, list[Flag]]] = {
    "demo": (
        "pneumoseg.stages.demo",
        "generate the synthetic SIIM-like DICOM demo set",
        [
            ("--out", "demo.out_dir", str, "output folder"),
            ("--n-train", "demo.n_train", int, "number of training images"),
            ("--n-test", "demo.n_test", int, "number of test images"),
            ("--size", "demo.size", int, "image side in pixels"),
            ("--seed", "demo.seed", int, "random seed"),
        ],
    ),
    "convert": (
        "pneumoseg.stages.convert",
        "convert DICOMs + RLE csv to PNG images/masks and a manifest",
        [
            ("--dicom-dir", "data.raw_dir", str, "folder searched recursively for <ImageId>.dcm"),
            ("--rle-csv", "data.rle_csv", str, "training RLE csv (default: found in --dicom-dir)"),
            ("--dialect", "data.rle_dialect", str, "RLE dialect: relative, absolute or auto"),
            ("--out", "data.processed_dir", str, "output folder"),
            ("--size", "data.size", int, "output image side in pixels"),
            ("--workers", "data.workers", int, "parallel worker processes"),
        ],
    ),
    "train": (
        "pneumoseg.stages.train",
        "train one model per fold with MLflow tracking (resumes after a kill)",
        [
            ("--fold", "fold", int, "train only this fold (default: every fold in train.folds)"),
            ("--epochs", "train.parts[0].epochs", int, "epochs of the first part"),
            ("--size", "train.parts[0].size", int, "image size of the first part"),
            ("--encoder", "train.model.encoder", str, "smp/timm encoder name"),
        ],
    ),
    "split": (
        "pneumoseg.stages.split",
        "assign stratified cross-validation folds",
        [
            ("--folds", "split.n_folds", int, "number of folds"),
            ("--seed", "split.seed", int, "random seed"),
            ("--out", "split.out", str, "output csv"),
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for all subcommands."""
    parser = argparse.ArgumentParser(
        prog="pneumoseg",
        description="Tracked, reproducible pneumothorax segmentation on chest X-ray DICOMs.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file [%(default)s]")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, flags) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        for flag, key, typ, flag_help in flags:
            cmd.add_argument(
                flag,
                dest=key,
                type=typ,
                default=None,
                metavar=flag.lstrip("-").upper().replace("-", "_"),
                help=f"{flag_help} [params: {key}]",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoseg`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pneumoseg.params import ParamsError, load_params

    module_name, _, flags = COMMANDS[args.command]
    values = {key: getattr(args, key) for _, key, _, _ in flags}
    # Keys that are not params (e.g. --fold) go to the stage's run() as keyword arguments.
    extra = {key: values.pop(key) for key in list(values) if "." not in key}
    overrides = values
    try:
        params = load_params(args.params, overrides)
    except ParamsError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    try:
        module.run(params, progress=not args.quiet, **extra)
    except (ValueError, RuntimeError, OSError) as exc:
        # Our own error types subclass these; their messages are one line for the user.
        print(f"pneumoseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
