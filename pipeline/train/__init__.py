"""The learner: encoder/actor/critic (``networks``), the TD3 agent (``td3``), the loop (``loop``)."""

from pipeline.train.td3 import TD3Agent, TD3Config

__all__ = ["TD3Agent", "TD3Config"]
