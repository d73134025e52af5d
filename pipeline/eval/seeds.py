"""Which episode seeds evaluate what, kept apart so that choosing a checkpoint never sees the test.

- test: ``pipeline eval`` resets each route with its own seeds (0-4 for every named route), or
  ``--seed S`` and up;
- validation: ``pipeline train --eval-every`` scores the policy on :data:`VALIDATION_SEED` and up
  (``--eval-seed``) and keeps the best one in ``best.pt``;
- training episodes start at 10,000 (``pipeline.train.loop.RolloutWorker``), and the datasets
  ``benchmarks/learning.py`` collects at 100,000.

A module of its own, with no imports, so that the CLI can show the default without loading torch.
"""

VALIDATION_SEED = 1_000
