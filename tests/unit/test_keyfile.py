"""Private keys are 0600 from the moment they exist (pefsim/keyfile.py), and `pefsim keys`
does not replace a signing key unless told to."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from pefsim import keyfile
from pefsim.blob import load_private_key, new_signing_key, save_keypair
from pefsim.ops.stack import ROOT
from pefsim.tls import make_ca, make_cert


@pytest.fixture
def creations(monkeypatch):
    """Every file created through os.open while the test runs, as inode -> mode asked for, under
    umask 0: a file the write path made any other way (``write_bytes``, ``open``) is missing
    here, and would have been born 0666."""
    made: dict[int, int] = {}
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *a, **kw):
        fd = real_open(path, flags, mode, *a, **kw)
        if flags & os.O_CREAT:
            made[os.fstat(fd).st_ino] = mode
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    old = os.umask(0)
    yield made
    os.umask(old)


def assert_born_private(path, made):
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: {oct(st.st_mode)}"
    assert st.st_ino in made, f"{path} was not created by os.open with a mode: it was born with the umask's"
    assert made[st.st_ino] & 0o077 == 0, f"{path} was created {oct(made[st.st_ino])}"


def test_tls_and_signing_keys_are_born_0600(tmp_path, creations):
    make_ca(tmp_path / "tls")
    make_cert(tmp_path / "tls", "hv")
    priv, pub = save_keypair(new_signing_key(), tmp_path / "keys")
    for path in (tmp_path / "tls/ca.key", tmp_path / "tls/hv.key", priv):
        assert_born_private(path, creations)
    assert stat.S_IMODE(os.stat(pub).st_mode) & 0o044  # the public halves stay readable


def test_a_replaced_key_is_born_0600_and_nothing_is_left_beside_it(tmp_path, creations):
    path = tmp_path / "k.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    keyfile.write_private(path, b"new", replace=True)
    assert path.read_bytes() == b"new"
    assert_born_private(path, creations)
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


def test_write_private_never_goes_through_what_is_there(tmp_path):
    target = tmp_path / "elsewhere"
    (tmp_path / "k.key").symlink_to(target)
    with pytest.raises(FileExistsError):
        keyfile.write_private(tmp_path / "k.key", b"secret")
    assert not target.exists()


def test_save_keypair_refuses_to_replace_a_signing_key_unless_forced(tmp_path):
    first, _ = save_keypair(new_signing_key(), tmp_path)
    before = first.read_bytes()
    with pytest.raises(FileExistsError):
        save_keypair(new_signing_key(), tmp_path)
    assert first.read_bytes() == before
    save_keypair(new_signing_key(), tmp_path, force=True)
    assert first.read_bytes() != before
    load_private_key(first)


def keys(*args):
    return subprocess.run([sys.executable, "-m", "pefsim", "keys", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_pefsim_keys_does_not_overwrite_a_signing_key_without_force(tmp_path):
    out = tmp_path / "k"
    assert keys("--out", str(out)).returncode == 0
    key = (out / "esm-signing.key").read_bytes()
    again = keys("--out", str(out))
    assert again.returncode != 0 and "exists: not replaced" in again.stderr and "--force" in again.stderr
    assert (out / "esm-signing.key").read_bytes() == key
    kept = keys("--out", str(out), "--if-missing")
    assert kept.returncode == 0 and (out / "esm-signing.key").read_bytes() == key
    forced = keys("--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "esm-signing.key").read_bytes() != key
    assert stat.S_IMODE(os.stat(out / "esm-signing.key").st_mode) == 0o600


def test_public_key_is_read_without_the_serialization_package(tmp_path):
    """The UV's --trusted-key: save_keypair's Ed25519 key is read back as the same key; any other
    key type, a private key, bad base64 or no PEM at all is a ValueError naming the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448

    from pefsim.blob import load_public_key

    key = new_signing_key()
    priv, pub = save_keypair(key, tmp_path)
    assert load_public_key(pub).public_bytes_raw() == key.public_key().public_bytes_raw()
    others = [k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
              for k in (ec.generate_private_key(ec.SECP256R1()), ed448.Ed448PrivateKey.generate())]
    bad = tmp_path / "bad.pub"
    for content in [*others, priv.read_bytes(), b"", b"-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----\n",
                    pub.read_bytes().replace(b"MCow", b"MCox")]:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="bad.pub"):
            load_public_key(bad)
