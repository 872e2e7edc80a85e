"""The PEF ABI as Python IntEnums, built from protos/pefsim/v1/abi.proto.

The numbers live only in the proto file; this module turns each proto enum into an IntEnum so
code says ``H.H_PARAMETER`` or ``U.U_P5`` and never a bare number.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any

from pefsim.v1 import abi_pb2


def _from_proto(enum: Any) -> Any:
    desc = enum.DESCRIPTOR
    return IntEnum(desc.name, [(v.name, v.number) for v in desc.values], module=__name__)


Ucall = _from_proto(abi_pb2.Ucall)
Hcall = _from_proto(abi_pb2.Hcall)
H = _from_proto(abi_pb2.HReturn)
U = _from_proto(abi_pb2.UReturn)
PageInFlag = _from_proto(abi_pb2.PageInFlag)
SecureGuest = _from_proto(abi_pb2.SecureGuestFlag)
VmState = _from_proto(abi_pb2.VmState)
GfnState = _from_proto(abi_pb2.GfnState)
SvmState = _from_proto(abi_pb2.SvmState)
GpfState = _from_proto(abi_pb2.GpfState)
VcpuState = _from_proto(abi_pb2.VcpuState)
Errno = _from_proto(abi_pb2.Errno)
Role = _from_proto(abi_pb2.Role)
AbortReturn = _from_proto(abi_pb2.AbortReturn)
EsmCopy = _from_proto(abi_pb2.EsmCopy)

# Page size everywhere in the protocol: 64 KiB, page shift ("order") 16. Both HV and UV refuse
# any other order.
PAGE_SHIFT = 16
PAGE_SIZE = 1 << PAGE_SHIFT


def rc_name(rc: int, family: Any = None) -> str:
    """Name of a return code: looked up in `family` (H or U) first, then the other one."""
    for fam in ([family] if family is not None else []) + [U, H]:
        try:
            return fam(rc).name
        except ValueError:
            continue
    return str(rc)


def gfn_of(gpa: int) -> int:
    return gpa >> PAGE_SHIFT


def gpa_of(gfn: int) -> int:
    return gfn << PAGE_SHIFT


def page_aligned(addr: int) -> bool:
    return addr & (PAGE_SIZE - 1) == 0


# pefsim's model of the machine's real-address map (not ABI numbers; the UV and HV check page
# addresses against it as the real UV checks src_ra/dest_ra). Secure memory sits high, HV pages
# low; 0 is never a valid page address.
SECURE_RA_BASE = 0x4000_0000_0000_0000
HV_RA_BASE = 0x0000_0001_0000_0000


def is_secure_ra(ra: int) -> bool:
    return ra >= SECURE_RA_BASE
