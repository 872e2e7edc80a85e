"""Errors the HV's handlers turn into PEF results or errnos."""


class UvUnreachable(Exception):
    """A ucall failed in transport: the UV is down or unreachable."""


class UvReset(UvUnreachable):
    """The answer came from a UV that restarted since (a machine reset): the state a VM kept in
    the UV is gone. The HV fails those VMs; the caller stops what it was doing for one."""
