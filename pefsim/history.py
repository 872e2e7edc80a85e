"""The history a service keeps: one JSON line per call it served or made (for the chaos checker,
the timeline and debugging)."""
from __future__ import annotations

import json
from typing import Any

from pefsim import clock, tracing


class History:
    """Append-only JSON-lines record of every call a service served (for checkers and debugging)."""

    def __init__(self, path: str | None, service: str):
        self.service = service
        self._fh = open(path, "a", buffering=1) if path else None

    def record(self, **event: Any) -> None:
        if self._fh is not None:
            event = {"t": clock.wall_ns() / 1e9, "svc": self.service, **event}
            span = tracing.CURRENT.get()
            if span is not None:  # the call's span (pefsim/tracing.py): the timeline's causal arrows
                event.update(span.fields())
            self._fh.write(json.dumps(event, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
