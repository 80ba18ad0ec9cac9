"""How the command line talks to its user: logging set-up (one line per record, our progress
at INFO, no URL password), one-line errors (with ``--debug``, the traceback above), and
SIGTERM handled like Ctrl-C (the command stops where it is; a rerun continues)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pneumoseg.redact import redact_text

DEBUG_ENV = "PNEUMOSEG_DEBUG"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_logging(debug: bool) -> None:
    """Our own lines at INFO, other libraries' when they warn; tracebacks in log records
    shrink to their last line unless ``debug``; every line passes the redactor."""
    from pneumoseg import redact

    redact.install()  # every record of every logger, whichever handler prints it
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not debug:
            handler.setFormatter(OneLineFormatter(LOG_FORMAT))
        handler.addFilter(redact.RedactingFilter())  # records made before install()
    logging.captureWarnings(True)  # libraries' warnings become (redacted) log records
    logging.getLogger("pneumoseg").setLevel(logging.INFO)


def report_error(command: str, exc: BaseException, debug: bool) -> None:
    """``pneumoseg COMMAND: error: <one line>`` on stderr; with ``debug`` the (redacted)
    traceback above it, e.g. to see where a CUDA out-of-memory (a ``RuntimeError``) happened."""
    if debug:
        import traceback

        print(redact_text("".join(traceback.format_exc())), file=sys.stderr, end="")
    print(f"pneumoseg {command}: error: {redact_text(one_line(exc))}", file=sys.stderr)


# The libraries whose errors describe the outside world (a store, a server, a bucket): their
# message is what a user needs, in one line; the traceback only with --debug.
ENGINES = ("mlflow", "sqlalchemy", "alembic", "optuna", "psycopg", "botocore", "boto3", "dvc",
           "requests", "urllib3", "pydicom", "torch")  # fmt: skip


def engine_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from one of :data:`ENGINES` (not a bug of ours)."""
    return type(exc).__module__.split(".")[0] in ENGINES


class OneLineFormatter(logging.Formatter):
    """Log records on one line: an attached traceback becomes its last line (the error).

    pydicom logs a decoder's traceback for a corrupt file that pneumoseg already reports as a
    failure row; a user reads one line per problem, not a stack.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(
            logging.makeLogRecord(
                {**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None}
            )
        )
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line += f" ({type(error).__name__}: {redact_text(one_line(error))})"
        return line


def one_line(exc: BaseException) -> str:
    """The user's line of an error; one re-raised by a DataLoader worker carries the worker's
    traceback in its message, whose last line is the original error."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].split(": ", 1)[-1]
    return text


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the command stops where it is (exit code 128 + the signal)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name


def terminated(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pneumoseg")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def add_completion(parser: argparse.ArgumentParser) -> None:
    """``--print-completion bash|zsh|tcsh``: a shell completion script (shtab, which DVC
    already installs)."""
    try:
        import shtab
    except ImportError:  # pragma: no cover - a dependency; the rest of the CLI works without it
        return
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script")
