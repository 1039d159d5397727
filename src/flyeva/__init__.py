"""flyeva: EVA masked visual representation learning at scale, end to end."""

__version__ = "0.1.0"
