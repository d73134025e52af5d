"""User-facing errors.

Anything raised as a :class:`PipelineError` is printed by the CLI as one line and turned into a
non-zero exit code; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem the user can fix (bad input, missing server, wrong store). Message is one line."""

    exit_code = 2


class UnknownRouteError(PipelineError):
    pass


class StoreError(PipelineError):
    """Missing, corrupt or incompatible dataset store."""


class SpecMismatchError(PipelineError):
    """Observation/action spec of a store, checkpoint or env does not match."""


class SimulatorUnavailableError(PipelineError):
    """The simulator server cannot be reached (CARLA)."""
