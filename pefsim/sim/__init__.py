"""The deterministic simulator (issue 15): the real UV, HV and guest cores (services/local.py) run
under a virtual-time event loop (loop.py) with seeded entropy, so a seed replays byte for byte."""
