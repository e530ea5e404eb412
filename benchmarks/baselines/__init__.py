"""Baselines: the designs trio-stream-server is measured against (not shipped in ``server``)."""
