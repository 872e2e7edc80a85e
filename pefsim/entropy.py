"""The entropy port: where the cores' random bytes come from (the UV's keys and nonces, boot ids,
the nonce of a shared-memory offer). ``ENTROPY`` is the operating system's by default; the
simulator installs a seeded one (``use``) so a seed replays byte for byte."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Callable

ENTROPY: Callable[[int], bytes] = os.urandom


def token_bytes(n: int) -> bytes:
    return ENTROPY(n)


def token_hex(n: int) -> str:
    return ENTROPY(n).hex()


@contextlib.contextmanager
def use(seed: int):
    """Random bytes from a generator seeded with ``seed`` for the block (not for real secrets:
    the simulator's keys only protect simulated guests)."""
    global ENTROPY
    before, rng = ENTROPY, random.Random(seed)
    ENTROPY = rng.randbytes
    try:
        yield
    finally:
        ENTROPY = before
