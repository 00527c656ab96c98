"""The systemd drop-in that lets the hardened service write into the configured library roots.

cinecut-cache.service runs with ProtectSystem=strict (the whole file system read-only) and
ProtectHome=yes (/home, /root and /run/user hidden). The admin grants write access to the film
libraries, and only to them, with a drop-in generated from the daemon's own config:

    cinecutd systemd-dropin --config /etc/cinecut/cinecutd.toml --write
    systemctl daemon-reload && systemctl restart cinecut-cache

Each path is prefixed with "-" so a library on an unplugged disk does not stop the service from
starting (systemd would otherwise fail it with 226/NAMESPACE). Libraries under /home (or /root,
/run/user) cannot be re-opened with ReadWritePaths= once ProtectHome=yes hid them: for those the
drop-in switches to ProtectHome=tmpfs (an empty /home) and binds just the library back in.

``--run-as USER`` (the account that runs CineCut on these libraries) makes the service run as that user.
Upstream CineCut writes its checkpoint and cache with ``mkstemp`` + ``os.replace``: mode 0600, owner only.
No group or ACL setup reaches such a file (``mkstemp``'s 0600 also zeroes the ACL mask), so a service
running as its own user cannot read the checkpoint it must reset. Running as the owner reads them without
any capability (the unit keeps ``CapabilityBoundingSet=`` empty): CAP_DAC_OVERRIDE would instead let a
daemon that parses untrusted files read every file on the box, ``/etc/shadow`` included. The files it
rewrites keep their owner, group and mode (``cinecut.keepattrs``); to keep a group it must be a member of
it, hence ``SupplementaryGroups=`` with the user's primary group and ``PrivateUsers=no`` (in a private user
namespace those groups are unmapped and a file's group cannot be set). ``Group=cinecut`` stays, so the
control socket and the GPU lock keep their group.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = ["DROPIN_PATH", "DropinError", "RunAs", "quote_path", "render_dropin", "run_as_user"]

DROPIN_PATH = PurePosixPath("/etc/systemd/system/cinecut-cache.service.d/libraries.conf")
_HOME_TREES = (PurePosixPath("/home"), PurePosixPath("/root"), PurePosixPath("/run/user"))


class DropinError(ValueError):
    """A path that cannot be written into a unit file (relative, control characters, not UTF-8)."""


@dataclass(frozen=True)
class RunAs:
    """The account the service runs as (``--run-as``) and its primary group."""

    user: str
    group: str


def run_as_user(name: str) -> RunAs:
    """Look up ``--run-as NAME``: an existing account other than root, named safely for a unit file."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise DropinError(f"--run-as {name}: no such user") from None
    if pw.pw_uid == 0:
        raise DropinError("--run-as root: the service never needs root; name the account that runs CineCut")
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    for value in (pw.pw_name, group):
        if not value or any(not (ch.isalnum() or ch in "._-") for ch in value):
            raise DropinError(f"--run-as {name}: {value!r} cannot be written into a unit file")
    return RunAs(pw.pw_name, group)


def _normalize(path: os.PathLike[str] | str) -> PurePosixPath:
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise DropinError(f"library path must be text, not {type(raw).__name__}")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise DropinError(f"{shown}: unit files are UTF-8; rename the folder or grant access by hand") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in raw):
        raise DropinError(f"{raw!r}: control characters cannot be written into a unit file")
    if not raw.startswith("/"):
        raise DropinError(f"{raw}: library paths in the drop-in must be absolute")
    norm = PurePosixPath(os.path.normpath(raw))
    if str(norm).startswith("//"):  # normpath keeps a leading "//"
        norm = PurePosixPath("/" + str(norm).lstrip("/"))
    if norm == PurePosixPath("/"):
        raise DropinError("/: refusing to make the whole file system writable")
    return norm


def quote_path(path: PurePosixPath, prefix: str = "") -> str:
    """One word of a systemd path list: double-quoted, with \\, " and % escaped.

    systemd splits these settings like a shell (so spaces need quotes), removes one level of
    backslash escaping, then expands specifiers (so a literal % is written %%).
    """
    text = prefix + str(path)
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{text}"'


def _under_home(path: PurePosixPath) -> bool:
    return any(path == top or top in path.parents for top in _HOME_TREES)


def _dedupe(paths: Iterable[PurePosixPath]) -> list[PurePosixPath]:
    """Sorted, without duplicates and without paths already covered by a parent in the list."""
    out: list[PurePosixPath] = []
    for p in sorted(set(paths), key=lambda q: (len(q.parts), str(q))):
        if not any(q == p or q in p.parents for q in out):
            out.append(p)
    return sorted(out, key=str)


def render_dropin(
    library_paths: Iterable[os.PathLike[str] | str],
    extra_read_write: Iterable[os.PathLike[str] | str] = (),
    read_only: Iterable[os.PathLike[str] | str] = (),
    *,
    source: str | None = None,
    run_as: RunAs | None = None,
    loopback_listeners: Iterable[str] = (),
) -> str:
    """The `[Service]` drop-in text granting write access to the library roots.

    extra_read_write: other folders the daemon must write (rare: e.g. a work area outside the
    libraries). read_only: folders it must only read; only those under /home need a line (the
    unit hides /home; everything else is readable already), e.g. a model directory.
    source: the config file named in the header comment. run_as: run the service as this account (the
    one that runs CineCut, whose 0600 files the service must read and rewrite). loopback_listeners: what
    the daemon serves on loopback (``metrics on 127.0.0.1:9817``): the unit has no network otherwise
    (``PrivateNetwork=yes``, ``IPAddressDeny=any``), so this gives it the host's loopback and nothing more.
    """
    rw = _dedupe(_normalize(p) for p in [*library_paths, *extra_read_write])
    ro = [p for p in _dedupe(_normalize(p) for p in read_only)
          if not any(q == p or q in p.parents for q in rw)]
    ro = [p for p in ro if _under_home(p)]
    if not rw and not ro:
        raise DropinError("no library paths: add a [[library]] section to the config first")
    lines = [
        "# Generated by `cinecutd systemd-dropin`" + (f" from {source}" if source else "") + ".",
        "# Grants cinecut-cache.service write access to the film libraries (the unit makes the",
        "# rest of the file system read-only). Regenerate it after changing library paths, then",
        "# run: systemctl daemon-reload && systemctl restart cinecut-cache",
        "# A leading '-' lets the service start while a library's disk is not mounted.",
        "[Service]",
    ]
    home_rw = [p for p in rw if _under_home(p)]
    home_ro = [p for p in ro if _under_home(p)]
    if home_rw or home_ro:
        lines.append("# Libraries under /home: show an empty /home and bind only these folders back.")
        lines.append("ProtectHome=tmpfs")
    lines += [f"ReadWritePaths={quote_path(p, '-')}" for p in rw if not _under_home(p)]
    lines += [f"BindPaths={quote_path(p, '-')}" for p in home_rw]
    lines += [f"BindReadOnlyPaths={quote_path(p, '-')}" for p in home_ro]
    listeners = [str(x) for x in loopback_listeners]
    if listeners:
        lines += [
            f"# Served on loopback: {', '.join(listeners)}. The unit has no network of its own",
            "# (PrivateNetwork=yes); this shares the host's, reachable on loopback only.",
            "PrivateNetwork=no",
            "RestrictAddressFamilies=AF_INET AF_INET6",
            "IPAddressAllow=localhost",
        ]
    if run_as is not None:
        lines += [
            f"# CineCut run by {run_as.user} writes its checkpoint and cache 0600: the service runs as",
            f"# {run_as.user} to read and reset them, with no capability. Rewritten files keep their owner,",
            "# group and mode; to keep the group the service needs the user's group, unmapped inside a",
            "# private user namespace (PrivateUsers=no). Group=cinecut stays: the control socket's group.",
            f"User={run_as.user}",
            f"SupplementaryGroups={run_as.group}",
            "PrivateUsers=no",
        ]
    return "\n".join(lines) + "\n"
