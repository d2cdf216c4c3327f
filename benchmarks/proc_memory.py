"""
Resident memory of running processes, read from /proc: what the kernel charges each one, so a
peak counts every allocator (torch's, Python's, the C library's), not only tensors.

RssAnon is the memory a process owns; RssFile is pages of mapped files (the checkpoint's memory
maps), which the kernel can drop and reread, so they are reported apart.
"""


def resident_kib(pid):
    """{'RssAnon': KiB, 'RssFile': KiB} of process `pid`, or None once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {key: int(fields.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssFile")}
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def descendants(pid):
    """Every living process below `pid`, from the kernel's children lists."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            children = []
        found += children
        todo += children
    return found


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return []
