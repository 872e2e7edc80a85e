"""mTLS for every pair of services: a project CA and a certificate per identity.

Identities (the certificate's common name) are ``uv``, ``hv``, ``operator`` and ``guest:<name>``;
a server certificate's DNS names are its role (``uv``, ``hv``, ``guest``) and, for a guest, its
own name (``g1.guest``, server_name), and a client names the one it expects
(``grpc.ssl_target_name_override``): the HV talks to a UV certificate and not to a guest's, and
to a VM's vCPU only through the certificate of the guest that owns the VM. The caller's
identity, taken from the verified client certificate, is what the
call tables' authorization reads (pefsim/rpc.py: caller_of).

Files in a TLS directory: ``ca.pem`` (``ca.key`` where certificates are minted), and
``<file>.pem`` / ``<file>.key`` for each identity, where the file name is the identity with ``:``
as ``-`` (``guest-g1.pem``). ``pefsim certs`` makes them.
"""
from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

VALID_DAYS = 3650


def file_name(identity: str) -> str:
    return identity.replace(":", "-")


def role_of(identity: str) -> str:
    return identity.split(":", 1)[0]


IDENTITY = re.compile(r"(uv|hv|operator)|guest:[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_identity(identity: str) -> str:
    """``identity`` if it is one pefsim knows (``uv``, ``hv``, ``operator``, ``guest:<name>`` with
    a name of lower-case letters, digits and inner hyphens, at most 63: a DNS label, since it is
    also the certificate's server name); else ValueError."""
    if not IDENTITY.fullmatch(identity):
        raise ValueError(f"not an identity: {identity!r} (uv, hv, operator or guest:<name>, the name "
                         "a DNS label: a-z, 0-9 and inner '-', at most 63)")
    return identity


def server_name(identity: str) -> str:
    """The DNS name a client asks for to reach exactly ``identity``'s server: ``guest:g1`` ->
    ``g1.guest`` (each guest's own), ``uv`` -> ``uv``. A client that wants any server of a role
    asks for the role (``guest``): every certificate of the role carries it too."""
    role, _, name = identity.partition(":")
    return f"{name}.{role}" if name else role


# The certificate code imports `cryptography` when it runs: a service that only loads its
# credentials (the HV) does not carry the X.509 machinery in its memory.

def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> None:
    """0600 from its creation (pefsim/keyfile.py). A key is written only when its certificate is
    missing, so one already there is a leftover of an interrupted run: replaced."""
    from cryptography.hazmat.primitives import serialization

    from pefsim.keyfile import write_private

    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), replace=True)


def make_ca(directory: Path) -> None:
    """A new CA in ``directory`` (ca.pem, ca.key), unless one is there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.pem").exists():
        return
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pefsim CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(key, directory / "ca.key")
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_cert(directory: Path, identity: str) -> None:
    """A certificate for ``identity`` signed by the CA in ``directory``, unless one is there."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    stem = file_name(check_identity(identity))
    if (directory / f"{stem}.pem").exists():
        return
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(role_of(identity)), *([x509.DNSName(server_name(identity))] if ":" in identity else []),
             x509.DNSName("localhost"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write_key(key, directory / f"{stem}.key")
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Tls:
    """One identity's credentials."""

    directory: Path
    identity: str

    def _read(self, suffix: str) -> bytes:
        return (self.directory / f"{file_name(self.identity)}.{suffix}").read_bytes()

    @property
    def ca(self) -> bytes:
        return (self.directory / "ca.pem").read_bytes()

    def server_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self._read("key"), self._read("pem"))], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self._read("key"),
                                            certificate_chain=self._read("pem"))


def identity_of(auth_context: dict) -> str | None:
    """The verified client certificate's common name (None on a plaintext connection)."""
    names = auth_context.get("x509_common_name")
    if not names:
        return None
    name = names[0]
    return name.decode() if isinstance(name, bytes) else name


def add_args(ap) -> None:
    """--tls-dir / --insecure, for every pefsim process."""
    ap.add_argument("--tls-dir", type=Path, help="mTLS: directory with ca.pem and this identity's "
                    "certificate and key (made by `pefsim certs`)")
    ap.add_argument("--insecure", action="store_true",
                    help="plaintext gRPC, the caller's role asserted in metadata (logs a warning)")


def from_args(ap, a, identity: str) -> Tls | None:
    """The process's credentials, or None with --insecure (warned); an error if neither is given."""
    import logging

    if a.insecure and a.tls_dir:
        ap.error("give --tls-dir or --insecure, not both")
    if a.insecure:
        logging.getLogger("pefsim.tls").warning(
            "INSECURE: plaintext gRPC; callers' roles are asserted, not authenticated")
        return None
    if not a.tls_dir:
        ap.error("give --tls-dir DIR (mTLS, see `pefsim certs`) or --insecure")
    tls = Tls(a.tls_dir, identity)
    for suffix in ("pem", "key"):
        if not (a.tls_dir / f"{file_name(identity)}.{suffix}").exists():
            ap.error(f"{a.tls_dir} has no {file_name(identity)}.{suffix} for {identity}")
    if not (a.tls_dir / "ca.pem").exists():
        ap.error(f"{a.tls_dir} has no ca.pem")
    return tls
