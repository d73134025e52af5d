"""pipeline: an offline-first dataset and training pipeline for end-to-end driving RL.

Rooms, in the order data flows through them:
``envs`` (simulators) -> ``datasets`` (Zarr stores, replay) -> ``train`` (TD3) -> ``eval``.
"""

__version__ = "0.1.0"
