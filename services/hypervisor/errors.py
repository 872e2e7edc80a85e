"""Errors the HV's handlers turn into PEF results or errnos."""


class UvUnreachable(Exception):
    """A ucall failed in transport: the UV is down or unreachable."""
