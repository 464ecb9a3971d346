"""A test double of the Kubernetes API server subset warmstart uses. Tests only."""

from .server import FakeApiServer

__all__ = ["FakeApiServer"]
