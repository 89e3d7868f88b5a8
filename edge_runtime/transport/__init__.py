"""Message transports: MQTT (paho, the real one) and an in-memory fake for unit tests / simulation."""
