"""Typed errors that the CLI turns into one line and exit status 2."""


class StabilityLabError(Exception):
    """Base class for errors caused by user input: the message names the value and the fix."""


class ConfigError(StabilityLabError):
    """An invalid run configuration or option value."""


class DataError(StabilityLabError):
    """A dataset that is missing, empty or does not fit the model."""


class RunDirError(StabilityLabError):
    """A run directory that is missing, empty, incomplete or already in use."""


class TrainingError(StabilityLabError):
    """A training run that cannot continue, such as a non-finite loss."""


class PeerError(StabilityLabError):
    """An error that rank 0 raised and reported, re-raised in the other training processes."""
