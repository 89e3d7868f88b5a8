"""A stop request is never taken for a failed step."""

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.service import lifecycle


def test_a_stop_request_passes_through_handlers_of_failed_steps():
    lifecycle.reset()
    lifecycle.progress()   # no stop requested: nothing happens
    lifecycle.request_stop()
    try:
        with pytest.raises(lifecycle.Interrupted):
            try:
                lifecycle.progress()
            except EdgeRuntimeError:   # e.g. the agent's "cannot score layers" handler
                pytest.fail("a stop request was handled as a failed step")
    finally:
        lifecycle.reset()
