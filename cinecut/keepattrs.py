"""Owner, group and mode of the files an atomic write replaces or creates in someone else's work dir.

Upstream CineCut writes its checkpoint and cache with ``mkstemp`` + ``os.replace``: mode 0600, owned by
whoever ran it. A rewrite of ours goes through a new temp file renamed over the old name, so the new
inode would be owned by us, with our group and mode, unless we say otherwise. A checkpoint rewritten that
way and left 0600 under another owner is one upstream can no longer read (``load_checkpoint`` lets the
``PermissionError`` escape): its next run crashes. So the temp file takes the replaced file's owner,
group and mode before the rename, and a rewrite that would leave the previous owner unable to read the
file is refused instead of done.

New files (no file to replace) take the mode ``0666 & ~umask`` (the service's ``UMask=``), and, when we
run as root, the work dir's owner and group: a root run (``sudo cinecut analyze``, a daemon started by
hand) must not leave files in a user's work dir that this user's next run cannot rewrite in place.
An unprivileged process keeps its own uid (it cannot give files away) and gets the directory's group
where the directory is setgid (the kernel does that).
"""

from __future__ import annotations

import errno
import os
import stat

#: Permission bits a rewrite keeps: set-id bits are dropped (a data file never needs them).
KEPT_MODE_BITS = 0o1777

#: Mode for the temp file of a rewrite until it has the old file's owner and mode: nobody else can read
#: the new bytes meanwhile.
PRIVATE_MODE = 0o600

#: Mode for a new file: the process umask (or the directory's default ACL) decides the rest.
NEW_FILE_MODE = 0o666


class CannotKeepOwner(PermissionError):
    """A rewrite would leave the file's owner unable to read it: refused, the old file stays."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(errno.EPERM, f"cannot keep the owner of the file: {why}", name)


def create_mode(old: os.stat_result | None) -> int:
    """The mode to create the temp file with (before :func:`apply`)."""
    return PRIVATE_MODE if _regular(old) else NEW_FILE_MODE


def apply(fd: int, name: str, old: os.stat_result | None, dir_st: os.stat_result | None) -> None:
    """Give the open temp file ``fd`` the attributes the file ``name`` must keep (see module doc).

    ``old``: lstat of the file being replaced (None or not regular: a new file). ``dir_st``: stat of the
    directory. Raises :class:`CannotKeepOwner` when the replaced file's owner would lose read access.
    """
    if not _regular(old):
        if os.geteuid() == 0 and dir_st is not None:
            _chown(fd, dir_st.st_uid, dir_st.st_gid)
        return
    assert old is not None
    mode = stat.S_IMODE(old.st_mode) & KEPT_MODE_BITS
    _chown(fd, old.st_uid, old.st_gid)
    now = os.fstat(fd)
    uid_kept, gid_kept = now.st_uid == old.st_uid, now.st_gid == old.st_gid
    readable_by_old_owner = uid_kept or (gid_kept and mode & 0o040) or mode & 0o004
    if not readable_by_old_owner:
        raise CannotKeepOwner(
            name,
            f"it belongs to uid {old.st_uid} (mode {mode:04o}) and this process (uid {os.geteuid()}) can "
            "neither give it back nor leave it readable to that user; run the service as that user",
        )
    os.fchmod(fd, mode)


def _chown(fd: int, uid: int, gid: int) -> None:
    """Change what differs, the owner first and then the group alone (allowed to a file's owner if it is a
    member of the group); whatever cannot be changed stays as it is."""
    now = os.fstat(fd)
    if now.st_uid != uid:
        try:
            os.fchown(fd, uid, gid)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
    if now.st_gid != gid:
        try:
            os.fchown(fd, -1, gid)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise


def _regular(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISREG(st.st_mode)


__all__ = ["CannotKeepOwner", "apply", "create_mode"]
