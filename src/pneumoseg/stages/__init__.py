"""One module per pipeline stage; each has a pure core function and a ``run(params, ...)`` entry
that the CLI and ``dvc.yaml`` call."""
