"""Errors the HV's handlers turn into PEF results or errnos."""


class UvUnreachable(Exception):
    """A ucall failed in transport: the UV is down or unreachable."""


class UvReset(UvUnreachable):
    """The answer came from a UV that restarted since (a machine reset): the state a VM kept in
    the UV is gone. The HV fails those VMs; the caller stops what it was doing for one."""


class NoSpace(OSError):
    """The data directory cannot hold what a VM asked for (a memslot's RAM and GFN-state files,
    with the headroom its metadata needs): answered ENOSPC, and nothing of it is left behind."""
