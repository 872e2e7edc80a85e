"""ESM blobs and guest images."""
from __future__ import annotations

import pytest

from pefsim.abi import PAGE_SIZE
from pefsim.blob import BlobError, kernel_size, make_blob, measure, new_signing_key, parse_blob, verify_blob
from pefsim.image import GuestImage

IMG = GuestImage.of_size("g", 1 << 20)


def measured(img=IMG):
    return {"kernel": measure(img.kernel_bytes()), "initrd": measure(img.initrd_bytes()),
            "bootargs": measure(img.bootargs.encode())}


def test_good_blob_verifies():
    key = new_signing_key()
    manifest = verify_blob(make_blob(IMG, key), key.public_key(), measured())
    assert manifest.guest == "g" and manifest.digests["kernel-size"] == IMG.kernel_size


@pytest.mark.parametrize("kw, reason", [
    ({"override": {"kernel": "0" * 128}}, "mismatch-kernel"),
    ({"override": {"initrd": "0" * 128}}, "mismatch-initrd"),
    ({"override": {"bootargs": "0" * 128}}, "mismatch-bootargs"),
    ({"omit": ("kernel",)}, "missing-kernel"),
    ({"omit": ("initrd",)}, "missing-initrd"),
    ({"omit": ("bootargs",)}, "missing-bootargs"),
])
def test_bad_items_are_reported(kw, reason):
    key = new_signing_key()
    with pytest.raises(BlobError) as err:
        verify_blob(make_blob(IMG, key, **kw), key.public_key(), measured())
    assert err.value.reason == reason


def test_signature_by_another_key_is_refused():
    with pytest.raises(BlobError) as err:
        verify_blob(make_blob(IMG, new_signing_key()), new_signing_key().public_key(), measured())
    assert err.value.reason == "bad-signature"


def test_modified_manifest_breaks_the_signature():
    key = new_signing_key()
    blob = bytearray(make_blob(IMG, key))
    blob[30] ^= 1
    with pytest.raises(BlobError) as err:
        verify_blob(bytes(blob), key.public_key(), measured())
    assert err.value.reason in ("bad-signature", "bad-format")


@pytest.mark.parametrize("junk", [b"", b"PEFSIM-ESMB-1\n", b"x" * 200, b"PEFSIM-ESMB-1\n\xff\xff\xff\xff" + b"0" * 80])
def test_garbage_is_bad_format(junk):
    with pytest.raises(BlobError) as err:
        parse_blob(junk)
    assert err.value.reason == "bad-format"


def test_kernel_size_missing():
    key = new_signing_key()
    with pytest.raises(BlobError) as err:
        kernel_size(make_blob(IMG, key, omit=("kernel-size",)))
    assert err.value.reason == "missing-kernel-size"


def test_image_layout_and_content_are_deterministic():
    a, b = GuestImage.of_size("g", 1 << 20), GuestImage.of_size("g", 1 << 20)
    assert list(a.pages()) == list(b.pages())
    assert GuestImage.of_size("h", 1 << 20).page(12) != a.page(12)
    assert a.kbase == PAGE_SIZE and a.initrd_start < a.fdt < a.blob_start < a.data_start < a.mem_bytes
    assert len(a.kernel_bytes()) == a.kernel_size


def test_image_too_small_or_unaligned():
    with pytest.raises(ValueError):
        GuestImage.of_size("g", 4 * PAGE_SIZE)
    with pytest.raises(ValueError):
        GuestImage.of_size("g", (1 << 20) + 1)
