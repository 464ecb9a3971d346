"""Adapters that put third-party engines through `warmstart.worker.checkpoint_point`."""
