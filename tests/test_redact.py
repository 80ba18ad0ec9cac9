"""The one redactor: URL passwords (with raw ``@``, ``/``, ``:`` and ``%``), assigned secrets,
secret environment values; every logger's records; errors of the engines as one line."""

from __future__ import annotations

import logging

import pytest

from pneumoseg.redact import MASK, redact_text

URLS = [  # (text, what must remain, the secret)
    ("mysql://user:p@ss@h/db", "mysql://user:***@h/db", "p@ss"),
    ("postgresql://u:se/cret@h/db", "postgresql://u:***@h/db", "se/cret"),
    ("postgresql+psycopg://u:a:b%40c@127.0.0.1:5432/db", "postgresql+psycopg://u:***@127.0.0.1",
     "a:b%40c"),
    ("API request to https://bob:s3cr%2Ft@mlflow.example:5000/api/2.0 failed",
     "https://bob:***@mlflow.example:5000/api/2.0 failed", "s3cr%2Ft"),
    ('{"storage":"postgresql://u:pw@x@h/db","other":"a@b"}', "postgresql://u:***@h/db", "pw@x"),
    ("two: s3://k:first@bucket/a and http://k:second@host/b", "http://k:***@host/b", "second"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "kept", "secret"), URLS)
def test_url_passwords_are_masked_whole(text: str, kept: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out and kept in out and MASK in out


@pytest.mark.parametrize(
    "text",
    [
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "export MLFLOW_TRACKING_PASSWORD='wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'",
        '{"password": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}',
    ],
)
def test_assigned_secrets_are_masked(text: str) -> None:
    out = redact_text(text)
    assert "wJalrXUtnFEMI" not in out and MASK in out


def test_secret_environment_values_are_masked_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Zq9-env-canary-41")
    monkeypatch.setenv("PNEUMOSEG_ID_KEY", "id-key-canary-0123456789")
    text = "boto said: signature for Zq9-env-canary-41 failed; key id-key-canary-0123456789"
    out = redact_text(text)
    assert "Zq9-env-canary-41" not in out and "id-key-canary" not in out


def test_plain_text_is_left_alone() -> None:
    for text in ("n_tokens=5 for fold 0", "https://host:5000/#/experiments/1", "a@b.org",
                 "train.parts.0.lr: 0.003", "dice 0.84 (0.80-0.88)"):  # fmt: skip
        assert redact_text(text) == text


def test_every_logger_is_redacted_whatever_its_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """MLflow, SQLAlchemy, alembic and Optuna records, through handlers of their own (not the
    root's filter), with the secret in the message, an argument or the exception."""
    from pneumoseg.console import configure_logging

    configure_logging(debug=False)
    url = "postgresql://u:log-canary-77@h/db"
    for name in ("mlflow.store", "sqlalchemy.engine", "alembic.runtime", "optuna.storages"):
        logger = logging.getLogger(name)
        own = logging.StreamHandler()  # as these libraries attach
        logger.addHandler(own)
        logger.propagate = False
        try:
            logger.warning("connect %s", url)
            logger.warning(f"connect {url}")
            try:
                raise ConnectionError(f"cannot reach {url}")
            except ConnectionError:
                logger.exception("failed")
        finally:
            logger.removeHandler(own)
            logger.propagate = True
    err = capsys.readouterr().err
    assert "u:***@h/db" in err and "log-canary-77" not in err


def test_an_engine_error_is_one_redacted_line(tmp_path, monkeypatch) -> None:
    """An MlflowException (not a ValueError) from a tracking server answering 500 with the URL
    in its message: one line, no password, exit 1."""
    import io
    from contextlib import redirect_stderr

    from mlflow.exceptions import MlflowException

    from pneumoseg import cli

    def boom(*args, **kwargs):
        raise MlflowException(
            "API request to http://u:engine-canary-5@127.0.0.1:5000/api/2.0/mlflow/runs/create "
            "failed with exception HTTPConnectionPool: Max retries exceeded (500)"
        )

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.setattr(cli.Command, "runner", lambda self: boom)
    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["-q", "split"])
    text = err.getvalue()
    assert code == 1
    assert "engine-canary-5" not in text and "u:***@127.0.0.1" in text
    assert text.strip().count("\n") == 0 and "Traceback" not in text


def test_text_artifacts_are_uploaded_redacted(tmp_path, monkeypatch) -> None:
    """A text file the tracker uploads (a csv, a json, an HTML report) holds no secret in the
    store; its local file is left as it is; binary files go as they are."""
    from mlflow.tracking import MlflowClient

    from pneumoseg.params import MlflowParams
    from pneumoseg.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    cfg = MlflowParams(tracking_uri="sqlite:///mlruns/mlflow.db")
    tracker = Tracker(cfg)
    tracker.start("t", {"stage": "t"})
    report = tmp_path / "report.csv"
    report.write_text("storage\npostgresql://u:artifact-canary-3@h/db\n")
    blob = tmp_path / "weights.pt"
    blob.write_bytes(b"\x00\x01binary")
    tracker.log_artifact(report, "files")
    tracker.log_artifact(blob, "files")
    tracker.end()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    local = client.download_artifacts(tracker.run_id, "files", str(tmp_path / "down"))
    uploaded = (tmp_path / "down/files/report.csv").read_text()
    assert "artifact-canary-3" not in uploaded and "u:***@h/db" in uploaded
    assert (tmp_path / "down/files/weights.pt").read_bytes() == blob.read_bytes()
    assert "artifact-canary-3" in report.read_text()  # the local record is the user's
    assert local
