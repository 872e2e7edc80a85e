"""rpc.Admission: the per-identity bounds every call of every kind goes through (issue 13 items 4,
5, 8). The real-process attacks are in tests/security/test_hostile_tenants.py; these pin the rules."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from pefsim.abi import Role
from pefsim.rpc import (IDENTITY_HEADER, MAX_REQUEST_BYTES, ON_BEHALF_HEADER, ROLE_HEADER, Admission, Refused,
                        caller_of)


class Context:
    """What caller_of reads of a call in insecure mode: no certificate, the metadata."""

    def __init__(self, *metadata):
        self.metadata = metadata

    def auth_context(self):
        return {}

    def invocation_metadata(self):
        return self.metadata


def test_the_uv_and_hv_are_counted_per_guest_they_serve_and_nobody_else_can_claim_it():
    def caller(role, name, on_behalf=None):
        md = [(ROLE_HEADER, role), (IDENTITY_HEADER, name)]
        return caller_of(Context(*md, *([(ON_BEHALF_HEADER, on_behalf)] if on_behalf else [])))
    for role in ("uv", "hv"):
        assert caller(role, role, "a").on_behalf == "a"
        assert Admission.key_of(caller(role, role, "a")) != Admission.key_of(caller(role, role, "b"))
        assert Admission.key_of(caller(role, role, "a")) == Admission.key_of(caller(role, role, "a"))
    # a guest (or an operator) naming someone in the header is still itself
    assert Admission.key_of(caller("guest", "g1", "a")) == (Role.ROLE_GUEST, "g1", "")
    assert caller("operator", "op", "a").on_behalf == ""


def test_calls_in_flight_are_bounded_per_identity_and_come_back():
    async def scenario():
        admission = Admission(max_calls=2)
        a, b = (Role.ROLE_GUEST, "a", ""), (Role.ROLE_GUEST, "b", "")
        async with admission.admit(a), admission.admit(a):
            with pytest.raises(Refused) as refused:
                async with admission.admit(a):
                    pass
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.reason == "calls"
            async with admission.admit(b):  # another identity is not affected
                assert admission.held(b) == (1, 0)
        assert admission.held(a) == (0, 0)
        async with admission.admit(a):
            pass
    asyncio.run(scenario())


def test_request_bytes_are_reserved_before_a_read_and_settled_to_its_size():
    async def scenario():
        admission = Admission(max_bytes=2 * MAX_REQUEST_BYTES, wait_s=0.05)
        key = (Role.ROLE_GUEST, "a", "")
        async with admission.admit(key) as one, admission.admit(key) as two, admission.admit(key) as three:
            await one.reserve()
            await two.reserve()
            assert admission.held(key) == (3, 2 * MAX_REQUEST_BYTES)
            with pytest.raises(Refused) as refused:  # no room for a third read: waits, then refused
                await three.reserve()
            assert refused.value.reason == "bytes"
            one.settle(100)  # the messages were small: the rest of each reservation comes back
            two.settle(200)
            await three.reserve()
            assert admission.held(key) == (3, MAX_REQUEST_BYTES + 300)
        assert admission.held(key) == (0, 0)  # every byte given back when the calls end
    asyncio.run(scenario())


def test_a_waiting_read_gets_room_as_soon_as_another_settles():
    async def scenario():
        admission = Admission(max_bytes=MAX_REQUEST_BYTES, wait_s=5)
        key = (Role.ROLE_GUEST, "a", "")
        async with admission.admit(key) as one, admission.admit(key) as two:
            await one.reserve()
            waiting = asyncio.ensure_future(two.reserve())
            await asyncio.sleep(0)
            assert not waiting.done()
            one.settle(0)
            await asyncio.wait_for(waiting, 1)
    asyncio.run(scenario())
