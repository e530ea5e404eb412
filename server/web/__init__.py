"""The HTTP edge (Quart-Trio)."""

from .app import create_app as create_app
