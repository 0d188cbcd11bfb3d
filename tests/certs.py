"""Throw-away PKI for TLS tests: CAs, server and client certificates as PEM files.

Everything is generated with ``cryptography`` (EC P-256 keys, SHA-256
signatures) into a directory the caller owns, typically a pytest tmp dir.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rdzv.etcd_server import TLSFiles

_NO_USAGE = {
    "content_commitment": False, "key_encipherment": False, "data_encipherment": False,
    "key_agreement": False, "encipher_only": False, "decipher_only": False,
}  # fmt: skip


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files written by ``write_certificates``.

    Attributes:
        ca: the CA that signs ``server``, ``client`` and ``expired_client``.
        server, server_key: etcd's certificate, for 127.0.0.1 and localhost.
        client, client_key: a client certificate signed by ``ca``.
        other_ca: a CA that signs nothing here (a "wrong CA" for clients).
        expired_client, expired_client_key: signed by ``ca``, expired yesterday.
    """

    ca: str
    server: str
    server_key: str
    client: str
    client_key: str
    other_ca: str
    expired_client: str
    expired_client_key: str

    def tls_files(self, client_cert_auth: bool = False) -> TLSFiles:
        """etcd's TLS settings: server cert, plus client cert auth if asked."""
        return TLSFiles(
            cert=self.server,
            key=self.server_key,
            ca=self.ca,
            client_cert_auth=client_cert_auth,
            client_cert=self.client if client_cert_auth else None,
            client_key=self.client_key if client_cert_auth else None,
        )


class _Writer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.now = datetime.datetime.now(datetime.timezone.utc)

    def save(
        self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[str, str]:
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)

    def builder(
        self,
        subject: str,
        issuer: x509.Name | None,
        key: ec.EllipticCurvePrivateKey,
        valid: tuple[datetime.timedelta, datetime.timedelta],
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now + valid[0])
            .not_valid_after(self.now + valid[1])
        )

    def ca(self, stem: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self.builder(f"rdzv test {stem}", None, key, _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, **_NO_USAGE
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        path, _ = self.save(stem, cert, key)
        return cert, key, path

    def leaf(
        self,
        stem: str,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        usages: list[x509.ObjectIdentifier],
        valid: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    ) -> tuple[str, str]:
        ca_cert, ca_key = ca
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self.builder(stem, ca_cert.subject, key, valid or _VALID)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=False, crl_sign=False, **_NO_USAGE
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return self.save(stem, cert, key)


_VALID = (-datetime.timedelta(minutes=5), datetime.timedelta(days=1))
_EXPIRED = (-datetime.timedelta(days=2), -datetime.timedelta(days=1))


def write_certificates(directory: Path) -> Certificates:
    """Write a CA, a server and two client certificates, and an unrelated CA.

    Args:
        directory: an existing directory to write the PEM files into.

    Returns:
        The paths of the files.
    """
    writer = _Writer(directory)
    ca_cert, ca_key, ca_path = writer.ca("ca")
    _, _, other_ca_path = writer.ca("other-ca")
    ca = (ca_cert, ca_key)
    client_auth = [ExtendedKeyUsageOID.CLIENT_AUTH]
    # etcd's HTTP gateway dials etcd's own gRPC port with the server certificate,
    # so with client cert auth on, that certificate must allow client auth too.
    server, server_key = writer.leaf("server", ca, [ExtendedKeyUsageOID.SERVER_AUTH, *client_auth])
    client, client_key = writer.leaf("client", ca, client_auth)
    expired, expired_key = writer.leaf("expired-client", ca, client_auth, _EXPIRED)
    return Certificates(
        ca=ca_path,
        server=server,
        server_key=server_key,
        client=client,
        client_key=client_key,
        other_ca=other_ca_path,
        expired_client=expired,
        expired_client_key=expired_key,
    )
