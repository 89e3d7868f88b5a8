"""The project's one small error hierarchy; every error names what was wrong and where."""


class EdgeRuntimeError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(EdgeRuntimeError, ValueError):
    """A configuration value is invalid (the message names the field and the value)."""


class DataError(EdgeRuntimeError, ValueError):
    """A data file or row is invalid (the message names the file and line)."""


class ModelLoadError(EdgeRuntimeError):
    """A base model could not be found or loaded."""


class AggregationError(EdgeRuntimeError, ValueError):
    """Updates cannot be combined (mismatched keys, shapes, dtypes, bad weights, NaN)."""
