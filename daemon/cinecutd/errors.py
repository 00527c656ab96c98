"""Errors of the daemon's core, free of any protocol: the control socket maps them to its codes at its edge
(cinecutd.control), so the engine never speaks the wire format."""

from __future__ import annotations


class FilmQueryError(LookupError):
    """A film named by a user (path, file name or part of its path) is not one watched film."""

    def __init__(self, query: str, message: str) -> None:
        super().__init__(message)
        self.query = query
        self.message = message


class FilmNotFound(FilmQueryError):
    """No watched film matches the query."""


class FilmAmbiguous(FilmQueryError):
    """Several watched films match the query."""

    def __init__(self, query: str, message: str, matches: list[str]) -> None:
        super().__init__(query, message)
        self.matches = matches
