"""Test support shared by tests/, bench/ and demo scripts (tiny models, ComfyUI bootstrap, test server)."""
