"""X.509 certificates of a federation: its CA, one certificate per party, and what a certificate says.

``splitnn provision`` makes them (:func:`make_ca`, :func:`make_certificate`); a worker reads its own
at start (:func:`certificate_info`) to refuse a certificate made for another party
(:func:`check_certificate_name`) and to warn when it expires soon (:func:`expiry_warning`).
A party's certificate names it twice, as common name and as DNS subject-alternative name, which is
what the servers check (:func:`splitnn.transport.security.peer_identities`). Keys are ECDSA P-256.

Uses the `cryptography <https://cryptography.io>`_ package (the ``deploy`` extra), imported when
first needed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from splitnn.errors import ConfigurationError

#: A certificate that expires within this many days is a warning (worker log, ``splitnn status``).
EXPIRY_WARNING_DAYS = 30


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - the extra is missing
        raise ConfigurationError(
            "certificates need the 'cryptography' package: pip install 'splitnn[deploy]'"
        ) from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def pem_private_key(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (the file holding it must be the owner's alone)."""
    _, _, serialization, *_ = _crypto()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_certificate(cert) -> bytes:
    _, _, serialization, *_ = _crypto()
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str, days: int):
    """A new self-signed CA: ``(certificate, private key)``."""
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_certificate(common_name: str, alt_names: list[str], ca_cert, ca_key, days: int):
    """A certificate for ``common_name`` (and DNS names ``alt_names``), signed by the CA: ``(cert, key)``.

    Good for both ends of a mutual-TLS connection (server and client authentication): a worker
    serves with it and dials its peers with it.
    """
    x509, hashes, _, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in alt_names]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def load_ca(cert_path: Path, key_path: Path):
    """The CA certificate and key written by an earlier ``provision`` (for ``--add``)."""
    x509, _, serialization, *_ = _crypto()
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the federation CA ({cert_path}, {key_path}): {exc}") from None
    return cert, key


@dataclass(frozen=True)
class CertificateInfo:
    """What a certificate says: the names it vouches for and when it expires."""

    path: str
    names: frozenset[str]
    not_after: datetime.datetime

    def days_left(self, now: datetime.datetime | None = None) -> float:
        return (self.not_after - (now or _now())).total_seconds() / 86400


def certificate_info(path: str | Path) -> CertificateInfo:
    """Read a PEM certificate: its common name and DNS alternative names, and its expiry."""
    x509, _, _, _, _, NameOID = _crypto()
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigurationError(f"{path} is not a PEM certificate: {exc}") from None
    names = {a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return CertificateInfo(str(path), frozenset(str(n) for n in names), cert.not_valid_after_utc)


def check_certificate_name(path: str | Path, name: str) -> CertificateInfo:
    """The certificate at ``path`` if it names party ``name``; else ConfigurationError (the worker does not start:
    its peers would refuse every call it makes, and researchers could not reach it by name)."""
    info = certificate_info(path)
    if name not in info.names:
        raise ConfigurationError(
            f"the TLS certificate {path} is for {sorted(info.names) or 'nobody'}, not for this worker {name!r}: "
            f"start it with its own certificate (its kit's {name}.pem) or the name the certificate gives"
        )
    if info.days_left() <= 0:
        raise ConfigurationError(
            f"the TLS certificate {path} expired on {info.not_after:%Y-%m-%d}; provision a new one"
        )
    return info


def expiry_warning(info: CertificateInfo, now: datetime.datetime | None = None) -> str | None:
    """A warning when the certificate expires within :data:`EXPIRY_WARNING_DAYS` days; else None."""
    days = info.days_left(now)
    if days > EXPIRY_WARNING_DAYS:
        return None
    return f"certificate {info.path} expires on {info.not_after:%Y-%m-%d} (in {max(days, 0):.0f} days); renew it"
