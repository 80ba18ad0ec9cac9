"""Optuna studies: their storage (:mod:`~pneumoseg.studies.storage`), the worker that runs a
study over training params (:mod:`~pneumoseg.studies.runner`), what a study shows
(:mod:`~pneumoseg.studies.report`) and writing its best values into ``params.yaml``
(:mod:`~pneumoseg.studies.yaml_edit`). The command is :mod:`pneumoseg.commands.study`; the
threshold study of the pipeline uses the same storage and reporting."""
