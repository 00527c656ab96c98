"""cinecut: work directories of the CineCut trailer pipeline (checkpoint, cache, stage graph, locks)."""

__version__ = "0.1.0"
