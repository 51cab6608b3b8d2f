"""Errors that are the user's to fix: the CLI prints them on one line, without a traceback."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input (a config key, a file, a path) with a message that says what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the file and the dotted key."""


def permission_message(err: BaseException) -> str | None:
    """One line for a file the running user may not write (EACCES, EPERM, EROFS with a file name): the path,
    who runs, who owns the folder, what to do; None for any other error."""
    if not (isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and err.filename):
        return None
    path = err.filename
    uid, gid = os.getuid(), os.getgid()
    reason = "read-only file system" if err.errno == errno.EROFS else "permission denied"
    folder = Path(os.fsdecode(path)).absolute() if path else None
    msg = f"{reason}: {folder if folder else err} (running as uid {uid}, gid {gid}"
    while folder is not None and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder is not None and folder.exists():
        info = folder.stat()
        msg += f"; {folder} belongs to uid {info.st_uid}, gid {info.st_gid}, mode {stat.filemode(info.st_mode)}"
    msg += ")"
    if os.environ.get("STRUCTLORA_CONTAINER"):
        msg += (". In the container image, run as the owner of the mounted folder: "
                "docker run --user $(id -u):$(id -g) -v $PWD/runs:/work/runs ... (the image runs under any uid), "
                f"or make the host folder writable by uid {uid}")
    else:
        msg += f". Make it writable by uid {uid}, or choose a folder that is (--run-dir, --out)"
    return msg
