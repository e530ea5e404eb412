"""Fault tests start their own servers (each needs its own flags and store)."""

from tests.integration.conftest import pytest_runtest_makereport as pytest_runtest_makereport
