"""broker_server: the aggregation server side of edge_runtime (rounds, fleet, aggregation, state)."""

from edge_runtime import __version__

__all__ = ["__version__"]
