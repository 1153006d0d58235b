"""sinklm: pretraining with attention sinks and StreamingLLM evaluation."""

from data.version import __version__

__all__ = ["__version__"]
