"""The wire protocol: versioned messages, codec (JSON + safetensors, never pickle), topics, chunking."""
