"""Examples that ship with the docs; each one is exercised by the test suite."""
