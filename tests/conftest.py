"""Shared test set-up. pytest-trio runs in trio_mode; pytest-timeout (see
pyproject) is the hang guard for every test."""
