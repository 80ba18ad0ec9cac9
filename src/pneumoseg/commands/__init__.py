"""The commands that are not DVC stages: ``predict``, ``score``, ``models``, ``upload`` and
``study``; each module's ``run`` is the CLI entry."""
