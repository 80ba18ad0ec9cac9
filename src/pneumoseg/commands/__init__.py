"""The commands that are not DVC stages: ``predict``, ``score``, ``models``, ``upload``,
``study``, ``serve`` and ``adversarial``; each module's ``run`` is the CLI entry."""
