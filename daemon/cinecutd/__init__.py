"""cinecutd: the daemon that keeps CineCut caches of watched film libraries valid and warm."""

from cinecut import __version__

__all__ = ["__version__"]
