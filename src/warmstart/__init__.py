"""warmstart: checkpoint a warmed GPU inference worker once, restore replicas in seconds."""

__version__ = "0.1.0"
