"""pefsim: a distributed model of IBM POWER's Protected Execution Facility."""


def version(package: str = "pefsim") -> str:
    """The installed version of ``package`` ("(not installed)" from a checkout never installed)."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed(package)
    except PackageNotFoundError:
        return "(not installed)"
