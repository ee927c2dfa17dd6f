"""Finishing a file so that a crash or a power cut leaves either the old file or the whole new one, never a part."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# A full disk, a quota, a file-size limit (ulimit -f): no room to write, whichever (EDQUOT is not on every system).
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})
# Filesystems that cannot flush a folder (some FUSE, SMB and VirtualBox mounts) say so with these; the rename has
# happened all the same, so the work is not lost over it.
_CANNOT_SYNC_FOLDER = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM}


def fsync_path(path: Path) -> None:
    """Flush `path`'s data (a file) or its entries (a folder) to the disk."""
    if path.is_dir():
        if os.name != "posix":
            return  # Windows cannot open a folder; NTFS journals the rename itself
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            if error.errno in _CANNOT_SYNC_FOLDER:
                return
            raise
        try:
            os.fsync(descriptor)
        except OSError as error:
            if error.errno not in _CANNOT_SYNC_FOLDER:
                raise
        finally:
            os.close(descriptor)
        return
    # Read-write: Windows refuses to flush a file opened for reading only.
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def durable_replace(temporary: Path, destination: Path) -> None:
    """Rename the finished `temporary` onto `destination`: its data is on the disk before the name points at it (else
    a power cut can leave a whole-sized file of zeros under the final name), and the new name is after."""
    fsync_path(temporary)
    os.replace(temporary, destination)
    fsync_path(destination.parent)
