"""Command-line interface."""

from warmstart.cli.app import app, main

__all__ = ["app", "main"]
