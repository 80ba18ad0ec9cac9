"""A DVC remote on S3 (moto's server on 127.0.0.1, reached only through its endpoint URL): the
credentials live in ``.dvc/config.local``; ``dvc push``, a fresh ``git clone`` and ``dvc pull``
restore every output byte for byte; ``dvc exp push``/``pull`` through a bare git remote carry an
experiment to another clone (:func:`experiment_travels`, run by the tracking-server test on its
queued experiments)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from engines import S3
from pipeline_helpers import DvcProject, dvc, run

from .conftest import SECRET


def outputs(project: Path) -> dict[str, str]:
    """sha256 of every file of every output in dvc.lock (relative path -> digest)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    paths = {o["path"] for stage in lock.values() for o in stage.get("outs", [])}
    digests = {}
    for rel in sorted(paths):
        root = project / rel
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                digests[str(f.relative_to(project))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def add_remote(project: Path, s3: S3, local_only: bool = False) -> None:
    """The team's remote: URL and endpoint in .dvc/config, credentials in .dvc/config.local."""
    if not local_only:
        dvc("remote", "add", "-d", "store", f"s3://{s3.bucket}/dvc", cwd=project)
        dvc("remote", "modify", "store", "endpointurl", s3.endpoint, cwd=project)
    dvc("remote", "modify", "--local", "store", "access_key_id", s3.key_id, cwd=project)
    dvc("remote", "modify", "--local", "store", "secret_access_key", s3.secret, cwd=project)


def test_push_then_a_fresh_clone_pulls_every_output(
    dvc_project: DvcProject, s3: S3, tmp_path: Path
) -> None:
    project = dvc_project.copy(tmp_path / "p")
    add_remote(project, s3)
    assert SECRET not in (project / ".dvc/config").read_text()
    assert SECRET in (project / ".dvc/config.local").read_text()  # git-ignored by DVC
    run(["git", "add", ".dvc/config"], cwd=project)
    run(["git", "commit", "-qm", "remote"], cwd=project)
    pushed = dvc("push", cwd=project)
    assert SECRET not in pushed.stdout + pushed.stderr
    assert s3.keys("dvc/files/md5/")  # the cache objects are in the bucket
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], cwd=tmp_path)
    assert not (clone / "data/processed").exists()
    add_remote(clone, s3, local_only=True)
    dvc("pull", cwd=clone)
    assert outputs(clone) == outputs(project)
    assert "up to date" in dvc("status", cwd=clone).stdout


def experiment_travels(project: Path, name: str, s3: S3, tmp_path: Path) -> None:
    """``dvc exp push``/``pull`` through a bare git remote carry experiment ``name`` of
    ``project`` (a git + DVC project whose committed config had the S3 remote, see
    :func:`add_remote`, when the experiment ran) to a fresh clone: git refs to the origin,
    data to the S3 remote. Called by the tracking-server test on its reproduced project and
    queued experiment (a second experiment run here would cost a minute of CPU)."""
    baseline = (project / "models/postprocess.json").read_bytes()
    dvc("exp", "apply", name, cwd=project)
    expected = (project / "models/postprocess.json").read_bytes()
    assert expected != baseline  # the experiment's own output, not the baseline's
    run(["git", "checkout", "--", "."], cwd=project)  # the baseline again
    dvc("checkout", cwd=project)
    assert (project / "models/postprocess.json").read_bytes() == baseline
    origin = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(origin)], cwd=tmp_path)
    run(["git", "remote", "add", "origin", str(origin)], cwd=project)
    run(["git", "push", "-q", "origin", "HEAD:main"], cwd=project)
    dvc("push", cwd=project)
    pushed = dvc("exp", "push", "origin", name, cwd=project)  # git refs to origin, data to S3
    assert SECRET not in pushed.stdout + pushed.stderr
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], cwd=tmp_path)
    add_remote(clone, s3, local_only=True)
    dvc("exp", "pull", "origin", name, cwd=clone)
    dvc("exp", "apply", name, cwd=clone)
    dvc("pull", cwd=clone)
    assert (clone / "models/postprocess.json").read_bytes() == expected
