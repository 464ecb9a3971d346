"""Checkpoint and restore orchestration, the manifest, compatibility, timings.

Import the pieces from their modules (``warmstart.snapshot.checkpoint``,
``warmstart.snapshot.restore``); this package's import is side-effect free.
"""
