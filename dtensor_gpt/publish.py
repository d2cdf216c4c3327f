"""
Writing a directory so that it appears whole or not at all, and replaces only what may be replaced.

Everything is written into a temporary directory beside the destination, fsynced, and
renamed into place at the end; a process killed on the way leaves a temporary directory
that names it (pid and host), which the next writer to the same destination removes.
Checkpoint saves, training runs and the converter all publish through here. A training run
owns its destination while it lives through a lock file beside it (`take_lock`).
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import uuid


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, text):
    """Write `text` to `path` and fsync it."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def temporary_beside(path):
    """A fresh directory name beside `path`, naming the process that writes it (see `clean_stale_temporaries`)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


def process_alive(pid):
    """Whether a process with this id runs here (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale_temporaries(path):
    """
    Remove what a killed writer to `path` left beside it. Only directories of processes on
    this host that no longer run are touched; a previous directory moved aside (`.old`) by a
    writer killed in the middle of replacing it is put back if `path` is missing. Each action
    is reported on stderr.
    """
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"(\d+)@(.+)-[0-9a-f]{8}(\.old)?$")
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.match(entry)
        if not match or match.group(2) != socket.gethostname() or process_alive(int(match.group(1))):
            continue
        stale = os.path.join(parent, entry)
        if match.group(3) and not os.path.exists(path):
            os.rename(stale, path)
            print(f"note: restored {path} from {stale}, moved aside by a save that was killed (pid {match.group(1)})",
                  file=sys.stderr)
        else:
            shutil.rmtree(stale)
            print(f"note: removed {stale}, left by a save or conversion that was killed (pid {match.group(1)})",
                  file=sys.stderr)


def not_a_real_directory(path):
    """Why `path` cannot be replaced as a directory (a link, a file), or None."""
    if os.path.islink(path):
        return f"{path} is a symbolic link; refusing to replace it (give the directory it points to, or a new path)"
    if not os.path.isdir(path):
        return f"{path} is not a directory; refusing to replace it"
    return None


def check_apart(source, destination):
    """
    Refuse a destination that is the source, holds it or lies inside it, links resolved:
    replacing it would destroy what is being read.
    """
    src, dst = os.path.realpath(source), os.path.realpath(destination)
    if src == dst or src.startswith(dst + os.sep) or dst.startswith(src + os.sep):
        relation = "is" if src == dst else "holds" if src.startswith(dst + os.sep) else "lies inside"
        raise ValueError(f"the destination {destination} {relation} the source {source} (resolved: {dst} and {src}); "
                         f"write to a directory apart from it")


def no_room(path, needed):
    """Why `needed` bytes cannot be written beside `path` (too little space where it would go), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):  # folders still to be made lie on the nearest existing one's device
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if needed <= free:
        return None
    return (f"no space for {path}: it needs {needed / 1e6:,.1f} MB and the device holding {parent} has "
            f"{free / 1e6:,.1f} MB free; free some space or write elsewhere")


def out_of_room(error, path, needed):
    """An OSError raised while writing, as one sentence naming the path and the space needed."""
    if error.errno == errno.ENOSPC:
        return f"the device ran out of space while writing {path}: it needs {needed / 1e6:,.1f} MB; nothing of it was kept"
    return f"writing {path} failed ({error}); nothing of it was kept"


def publish(tmp, path, overwrite, replaceable):
    """
    Rename the finished directory `tmp` to `path`. An existing `path` is replaced only with
    `overwrite` and only if `replaceable(path)` returns None; otherwise its answer (why not)
    is raised. Either refusal is a ValueError, raised before anything moves. If `tmp` cannot
    take the place of the existing `path`, that one is put back before the error is raised.
    """
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        refusal = replaceable(path)
        if refusal:
            raise ValueError(refusal)
        old = tmp + ".old"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)
            raise
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def take_lock(path):
    """
    Own `path` while this process lives: `.<name>.lock` beside it, holding pid@host, created
    with O_CREAT|O_EXCL so that of two processes only one gets it. A lock whose process is
    gone (this host, pid not running) is taken over with a note on stderr; a live owner's, or
    one on another host, is refused naming it. Returns the lock file's path for `release_lock`.
    """
    parent, name = os.path.split(os.path.abspath(path))
    lock = os.path.join(parent, f".{name}.lock")
    os.makedirs(parent, exist_ok=True)
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with open(lock) as f:
                pid, _, owner_host = f.read().partition("@")
            if owner_host == host and pid.isdigit() and not process_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):  # another newcomer removed it first
                    os.remove(lock)
                print(f"note: took over {lock} from pid {pid}, which no longer runs", file=sys.stderr)
                continue
            raise ValueError(f"{path} is in use by another run (pid {pid or '?'} on {owner_host or '?'}, per {lock}); "
                             f"wait for it to end, give another path, or remove {lock} if that process is gone")
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}@{host}")
        return lock


def release_lock(lock):
    """Remove `lock` if this process still holds it (a newcomer may have taken over a lock it wrongly thought dead)."""
    with contextlib.suppress(FileNotFoundError):
        with open(lock) as f:
            mine = f.read() == f"{os.getpid()}@{socket.gethostname()}"
        if mine:
            os.remove(lock)
