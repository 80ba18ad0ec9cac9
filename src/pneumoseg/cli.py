"""The ``pneumoseg`` command line: one table of subcommands, each a ``"module:function"``
(the pipeline's stages in :mod:`pneumoseg.stages`, the other commands in
:mod:`pneumoseg.commands`), imported only when it runs, so ``--help`` stays fast.

Defaults come from ``params.yaml`` (validated); flags override single keys. Results go to
stdout, progress and warnings to stderr (logging).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pneumoseg.console import (
    DEBUG_ENV,
    Interrupted,
    add_completion,
    configure_logging,
    engine_error,
    package_version,
    report_error,
    terminated,
)


@dataclass(frozen=True)
class Flag:
    """A command-line flag; ``key`` with a dot is a params key, else a keyword of the runner."""

    flag: str  # "--name", or a bare name for a positional argument
    key: str
    type: Any
    help: str
    required: bool = False
    nargs: str | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Command:
    """A subcommand: ``target`` is the ``"module:function"`` that runs it, imported only when
    it runs (heavy libraries stay out of ``--help``)."""

    help: str
    target: str
    flags: list[Flag] = field(default_factory=list)
    wants_params_file: bool = False  # the runner also gets params_file= (it edits the file)
    # "module:function" called with (params, argv) before the runner; it may exec another
    # process instead (train under torchrun)
    launcher: str | None = None
    examples: tuple[str, ...] = ()  # shown by --help

    def runner(self) -> Callable[..., Any]:
        return _resolve(self.target)


def _resolve(target: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` names, imported now."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "generate the synthetic SIIM-like DICOM demo set",
        "pneumoseg.stages.demo:run",
        [
            Flag("--out", "demo.out_dir", str, "output folder"),
            Flag("--n-train", "demo.n_train", int, "number of training images"),
            Flag("--n-test", "demo.n_test", int, "number of test images"),
            Flag("--size", "demo.size", int, "image side in pixels"),
            Flag("--seed", "demo.seed", int, "random seed"),
        ],
        examples=("pneumoseg demo --n-train 40 --n-test 10 --out data/raw/demo",),
    ),
    "convert": Command(
        "convert DICOMs + RLE csv to PNG images/masks and a manifest",
        "pneumoseg.stages.convert:run",
        [
            Flag("--dicom-dir", "data.raw_dir", str, "folder searched recursively for *.dcm"),
            Flag("--rle-csv", "data.rle_csv", str, "training RLE csv (default: in --dicom-dir)"),
            Flag("--dialect", "data.rle_dialect", str, "RLE dialect: relative, absolute, auto"),
            Flag("--out", "data.processed_dir", str, "output folder"),
            Flag("--size", "data.size", int, "output image side in pixels"),
            Flag("--workers", "data.workers", int, "parallel worker processes"),
            Flag(
                "--id-map",
                "id_map",
                str,
                "with data.pseudonymize_ids: write ImageId -> "
                "pseudonym csv here (keep it outside the repo)",
            ),  # fmt: skip
        ],
        examples=(
            "pneumoseg convert --dicom-dir data/raw/siim --workers 8",
            "pneumoseg convert --dialect absolute   # stage 2 csv",
        ),
    ),
    "arrays": Command(
        "write the training images and masks as uint8 arrays, once per training size",
        "pneumoseg.stages.arrays:run",
        [Flag("--out", "arrays.out_dir", str, "output folder")],
        examples=(
            'pneumoseg arrays && python -c "import numpy; '
            "print(numpy.load('data/arrays/256/images.npy', mmap_mode='r').shape)\"",
        ),
    ),
    "split": Command(
        "assign stratified cross-validation folds",
        "pneumoseg.stages.split:run",
        [
            Flag("--folds", "split.n_folds", int, "number of folds"),
            Flag("--seed", "split.seed", int, "random seed"),
            Flag("--out", "split.out", str, "output csv"),
        ],
        examples=("pneumoseg split --folds 5 --seed 42",),
    ),
    "train": Command(
        "train one model per fold with MLflow tracking (resumes after a kill)",
        "pneumoseg.stages.train:run",
        [
            Flag("--fold", "fold", int, "train only this fold (default: all of train.folds)"),
            Flag("--member", "member", str, "train ensemble member NAME (ensemble.members)"),
            Flag("--epochs", "train.parts[0].epochs", int, "epochs of the first part"),
            Flag("--size", "train.parts[0].size", int, "image size of the first part"),
            Flag("--encoder", "train.model.encoder", str, "smp/timm encoder name"),
        ],
        examples=(
            "pneumoseg train --fold 0",
            "dvc repro train@0          # the same, tracked by DVC",
            "dvc exp run -S train.nproc_per_node=2   # every fold in two torchrun ranks",
        ),
        launcher="pneumoseg.training.launch:torchrun_if_asked",
    ),
    "pseudo_label": Command(
        "label the confident test images with each fold's own model (pseudo_label.folds)",
        "pneumoseg.stages.pseudo_label:run",
        [Flag("--fold", "fold", int, "only this fold (default: all of pseudo_label.folds)")],
        examples=(
            "pneumoseg pseudo_label --fold 0",
            "dvc exp run -S 'pseudo_label.folds=[0,1]'   # labels, fine-tuning, oof ...",
        ),
    ),
    "finetune": Command(
        "continue each fold's model on its training images plus its pseudo-labels",
        "pneumoseg.stages.finetune:run",
        [Flag("--fold", "fold", int, "only this fold (default: all of pseudo_label.folds)")],
        examples=("pneumoseg finetune --fold 0", "dvc repro finetune@0   # the same, tracked"),
        launcher="pneumoseg.training.launch:torchrun_if_asked",
    ),
    "oof": Command(
        "out-of-fold probability maps of every trained fold",
        "pneumoseg.stages.oof:run",
        [
            Flag("--size", "oof.size", int, "map size S"),
            Flag("--checkpoints", "oof.checkpoints", str, "final, top_k or snapshots"),
        ],
        examples=("pneumoseg oof --checkpoints top_k",),
    ),
    "thresholds": Command(
        "Optuna search of the post-processing triplet on the OOF maps",
        "pneumoseg.stages.thresholds:run",
        [
            Flag("--trials", "thresholds.trials", int, "total trials of the study"),
            Flag("--storage", "thresholds.storage", str, "Optuna RDB URL or journal file"),
        ],
        examples=(
            "pneumoseg thresholds --trials 400",
            "PNEUMOSEG_OPTUNA_STORAGE=postgresql://optuna:$PW@db/optuna pneumoseg thresholds",
        ),
    ),
    "evaluate": Command(
        "OOF evaluation: in-sample, cross-fitted and untouched Kaggle dice, with provenance",
        "pneumoseg.stages.evaluate:run",
        examples=("pneumoseg evaluate && cat metrics/evaluate.json",),
    ),
    "submit": Command(
        "predict the test images and write a Kaggle submission csv",
        "pneumoseg.stages.submit:run",
        [
            Flag("--out", "submit.out", str, "submission csv"),
            Flag("--dialect", "submit.dialect", str, "relative or absolute RLE"),
        ],
        examples=("pneumoseg submit --dialect absolute --out submission/stage2.csv",),
    ),
    "score": Command(
        "Kaggle metric of a submission csv against a ground-truth csv",
        "pneumoseg.commands.score:run",
        [
            Flag("--submission", "submission", str, "submission csv", required=True),
            Flag("--truth", "truth", str, "ground-truth csv (ImageId, EncodedPixels)", True),
            Flag("--json", "json_out", bool, "print JSON"),
        ],
        examples=("pneumoseg score --submission submission/submission.csv --truth test-truth.csv",),
    ),
    "adversarial": Command(
        "adversarial validation: how well a classifier tells test from training images (AUC)",
        "pneumoseg.commands.adversarial:run",
        [
            Flag("--out", "out", str, "result JSON (default metrics/adversarial.json)"),
            Flag("--json", "json_out", bool, "print JSON"),
        ],
        examples=("pneumoseg adversarial    # AUC near 0.5: the folds resemble the test set",),
    ),
    "register": Command(
        "register the fold ensemble + TTA + post-processing as a new MLflow model version",
        "pneumoseg.stages.register:run",
        examples=("pneumoseg register && pneumoseg models list",),
    ),
    "result": Command(
        "record the pipeline's result as one MLflow row: every param, the honest scores, links",
        "pneumoseg.stages.result:run",
        examples=("pneumoseg result && cat metrics/result.json",),
    ),
    "models": Command(
        "the model registry: list, promote VERSION, rollback, show VERSION",
        "pneumoseg.commands.models:run",
        [
            Flag(
                "action",
                "action",
                str,
                "what to do",
                choices=("list", "promote", "rollback", "show"),
            ),
            Flag("version", "version", str, "version number or alias (promote, show)", nargs="?"),
            Flag("--json", "json_out", bool, "print JSON"),
        ],
        examples=(
            "pneumoseg models list",
            "pneumoseg models promote 3",
            "pneumoseg models rollback",
        ),
    ),
    "predict": Command(
        "predict DICOM files or folders; writes predictions.csv, mask and overlay PNGs",
        "pneumoseg.commands.predict:run",
        [
            Flag(
                "--model",
                "model",
                str,
                "models:/NAME@ALIAS or models:/NAME/VERSION, an MLflow model folder or a "
                "models/ folder (default: models:/<mlflow.registered_model>@champion)",
            ),
            Flag("--input", "inputs", str, "DICOM files or folders", required=True, nargs="+"),
            Flag("--out", "out", str, "output folder", required=True),
            Flag("--device", "device", str, "cpu, cuda or cuda:N (default: cuda if present)"),
        ],
        examples=(
            "pneumoseg predict --input scans/ --out predictions",
            "pneumoseg predict --model models:/pneumoseg/2 --input a.dcm b.dcm --out pred",
        ),
    ),
    "serve": Command(
        "serve a model over HTTP: MLflow's scoring server with a request-body limit",
        "pneumoseg.commands.serve:run",
        [
            Flag(
                "--model",
                "model",
                str,
                "models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow model folder "
                "(default: models:/<mlflow.registered_model>@champion)",
            ),
            Flag("--host", "host", str, "address to listen on (default 127.0.0.1)"),
            Flag("--port", "port", int, "port (default 5000)"),
            Flag("--max-body-mb", "serving.max_body_mb", float, "largest request body (413 above)"),
        ],
        examples=("pneumoseg serve --model models:/pneumoseg@champion --port 5000",),
    ),
    "upload": Command(
        "put an untracked fold training (MLflow was down) into MLflow from its local record",
        "pneumoseg.commands.upload:run",
        [Flag("--fold", "fold", int, "upload only this fold (default: all of train.folds)")],
        examples=("pneumoseg upload --fold 0 && dvc commit train@0",),
    ),
    "study": Command(
        "Optuna studies over training params: run (a worker), show, apply the best trial",
        "pneumoseg.commands.study:run",
        [
            Flag("action", "action", str, "what to do", choices=("run", "show", "apply")),
            Flag("name", "name", str, "study name (a key of studies: in params.yaml)"),
            Flag("--trials", "trials", int, "run: finished trials the study aims at"),
            Flag("--timeout", "timeout", str, "run: stop starting trials after (3600, 30m, 2h)"),
            Flag("--storage", "storage", str, "Optuna RDB URL or journal file"),
            Flag("--json", "json_out", bool, "show: print JSON"),
            Flag("--exp", "exp", bool, "apply: run `dvc exp run -S ...` instead of editing"),
        ],
        wants_params_file=True,
        examples=(
            "pneumoseg study run loss-and-sampling --trials 20",
            "pneumoseg study show loss-and-sampling",
            "pneumoseg study apply loss-and-sampling --exp",
        ),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for all subcommands."""
    parser = argparse.ArgumentParser(
        prog="pneumoseg",
        description="Tracked, reproducible pneumothorax segmentation on chest X-ray DICOMs.",
        epilog="examples:\n  dvc repro                      # the whole pipeline\n"
        "  pneumoseg train --help         # one command's flags and examples\n"
        "  pneumoseg --print-completion bash > ~/.local/share/bash-completion/completions/"
        "pneumoseg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pneumoseg {package_version()}")
    parser.add_argument("--params", default="params.yaml", help="params file [%(default)s]")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars: periodic progress lines instead (PNEUMOSEG_PROGRESS=off: none)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"full tracebacks instead of one-line errors (also {DEBUG_ENV}=1)",
    )
    add_completion(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in command.examples)
        cmd = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=epilog if command.examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for f in command.flags:
            where = f" [params: {f.key}]" if "." in f.key else ""
            if f.type is bool:
                cmd.add_argument(f.flag, dest=f.key, action="store_true", help=f.help)
            elif not f.flag.startswith("-"):
                cmd.add_argument(f.key, type=f.type, help=f.help, nargs=f.nargs, choices=f.choices)
            else:
                cmd.add_argument(
                    f.flag,
                    dest=f.key,
                    type=f.type,
                    default=None,
                    required=f.required,
                    nargs=f.nargs,
                    choices=f.choices,
                    metavar=f.flag.lstrip("-").upper().replace("-", "_"),
                    help=f.help + where,
                )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoseg`` console script."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")
    configure_logging(debug)
    from pneumoseg.params import ParamsError, load_params
    from pneumoseg.redact import redact_text

    command = COMMANDS[args.command]
    overrides = {f.key: getattr(args, f.key) for f in command.flags if "." in f.key}
    extra = {f.key: getattr(args, f.key) for f in command.flags if "." not in f.key}
    if command.wants_params_file:
        extra["params_file"] = args.params
    try:
        params = load_params(args.params, overrides)
    except ParamsError as exc:
        print(redact_text(str(exc)), file=sys.stderr)
        return 2
    if command.launcher:
        _resolve(command.launcher)(params, list(sys.argv[1:] if argv is None else argv))
    previous = signal.signal(signal.SIGTERM, terminated)  # a preempted machine: as Ctrl-C
    try:
        command.runner()(params, progress=not args.quiet, **extra)
    except KeyboardInterrupt as stop:
        stop = stop if isinstance(stop, Interrupted) else Interrupted()
        print(
            f"pneumoseg {args.command}: stopped by {stop.name}; rerun the same command to "
            "continue (training resumes from its last epoch)",
            file=sys.stderr,
        )
        return 128 + stop.signum
    except (ValueError, RuntimeError, OSError) as exc:
        # Our own error types subclass these; their messages are one line for the user.
        report_error(args.command, exc, debug)
        return 1
    except Exception as exc:  # an engine's error (MLflow, SQLAlchemy, ...) is one line too;
        # anything else is a bug, shown with its (redacted) traceback
        report_error(args.command, exc, debug or not engine_error(exc))
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
