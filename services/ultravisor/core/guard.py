"""The UV's call handlers, one module per family of calls (see calltable.py)."""
from __future__ import annotations


def guarded(uv, name: str, req, svm):
    """``svm``'s lock, taken through the call table's guard: the call's state looked at again under
    it, and the SVM still the one ``req.lpid`` names (lpids are reused: a call that waited on a
    terminated SVM's lock must not act on its successor)."""
    return uv.table.guard(name, req, svm.lock, still=lambda: uv.state.svms.get(req.lpid) is svm)
