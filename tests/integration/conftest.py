"""Fixtures of the tests against a real broker."""

import pytest

from tests.integration.mosquitto import Mosquitto


@pytest.fixture
def mosquitto(tmp_path):
    """A real Mosquitto of this test's own, on a free loopback port."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()
