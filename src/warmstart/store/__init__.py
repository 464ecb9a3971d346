"""Where snapshots live, and their integrity."""

from warmstart.store.local import LocalStore, Staging, default_root

__all__ = ["LocalStore", "Staging", "default_root"]
