"""Training one model per fold: :class:`~pneumoseg.training.trainer.FoldTrainer` (a short
loop over parts and epochs), :mod:`~pneumoseg.training.callbacks` (what runs after every
epoch), :mod:`~pneumoseg.training.state` (resume), :mod:`~pneumoseg.training.record` (final
weights and the fold's record), :mod:`~pneumoseg.training.parts` (optimizer, schedules, SWA
per part) and :mod:`~pneumoseg.training.distributed` (torchrun/DDP)."""
