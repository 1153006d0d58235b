"""The toolkit's version, recorded in what it writes (manifests, checkpoints, exports).

It lives at the bottom of the package graph so every layer can stamp it; ``sinklm.__version__`` re-exports it.
"""

__version__ = "0.1.0"
