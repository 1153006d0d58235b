"""sinklm: pretraining with attention sinks and StreamingLLM evaluation."""

__version__ = "0.1.0"
