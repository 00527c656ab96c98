"""The ways an analysis ends early, each with the exit code ``cinecut analyze`` gives it.

A module of its own so the pipeline's parts (the stages, the inference session, the GPU lock directory)
raise the same errors without importing each other; :mod:`cinecut.pipeline` re-exports them.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An analysis that cannot go on; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class ModelError(PipelineError):
    """No model given (on a cache miss), or the model pair cannot be loaded."""

    exit_code = 78  # EX_CONFIG


class FilmChangedError(PipelineError):
    """The film changed while it was analysed: the results were discarded."""

    exit_code = 4


class BusyError(PipelineError):
    """Another pipeline holds the work dir (or the GPU) and the caller chose not to wait."""

    exit_code = 75  # EX_TEMPFAIL


class WorkDirError(PipelineError):
    """The work dir cannot be created or used (permissions, a symlinked work dir)."""

    exit_code = 73  # EX_CANTCREAT


class TwinError(PipelineError):
    """The work dir holds the results of a same-stem twin that still exists (see :mod:`cinecut.twins`)."""

    exit_code = 77  # EX_NOPERM: not this film's to take without --take-over


class AnalysisStopped(PipelineError):
    """``should_stop`` asked to stop: progress is saved in the partial results."""

    exit_code = 3

    def __init__(self, message: str, done: int = 0, total: int = 0) -> None:
        super().__init__(message)
        self.done = done
        self.total = total
