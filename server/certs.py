"""Certificates and node keys for a federation (``medseg certs``).

* a certificate authority (CA) of the federation: ``ca.key`` + ``ca.crt``;
* the SuperLink's TLS certificate, signed by the CA, with the subject
  alternative names the sites will dial (DNS names and IP addresses):
  ``server.key`` + ``server.crt``;
* one key pair per site for SuperNode authentication: EC P-384 keys in
  OpenSSH format, which is what ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read:
  ``nodes/<site>`` (private, stays at the site) + ``nodes/<site>.pub``.

Private keys are written with mode 0600 and never overwritten silently.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medseg_core.errors import ConfigError

__all__ = ["CertPaths", "create_ca_and_server", "create_node_keys"]

_VALID_DAYS = 825  # the CA/Browser Forum's former maximum for leaf certificates
_CURVE = ec.SECP384R1()


@dataclass(frozen=True)
class CertPaths:
    """Where ``create_ca_and_server`` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{path} exists; refusing to overwrite a key or certificate. Pass --force to "
            "replace it (every site must then get the new CA certificate)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def create_ca_and_server(
    out_dir: str | Path, *, sans: list[str], org: str = "medseg-fl federation",
    overwrite: bool = False,
) -> CertPaths:
    """Create the federation's CA and the SuperLink certificate.

    Parameters
    ----------
    sans
        Names the sites will connect to, e.g. ``["aggregator.example.org",
        "10.0.0.5", "127.0.0.1"]``; the first is also the certificate's
        common name.

    Raises
    ------
    ConfigError
        No SAN given, or a file exists and ``overwrite`` is False.
    """
    if not sans:
        raise ConfigError("the server certificate needs at least one --san (a host name or IP "
                          "address the sites will dial, e.g. --san 127.0.0.1)")
    out = Path(out_dir)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(_CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{org} CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(_CURVE)
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                                 x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = CertPaths(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    _write(paths.ca_key, _pem_key(ca_key), private=True, overwrite=overwrite)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False,
           overwrite=overwrite)
    _write(paths.server_key, _pem_key(srv_key), private=True, overwrite=overwrite)
    _write(paths.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM), private=False,
           overwrite=overwrite)
    return paths


def create_node_keys(out_dir: str | Path, site_id: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """An EC key pair (OpenSSH format) for one site's SuperNode authentication.

    Returns ``(private_key_path, public_key_path)``; the private key stays
    at the site, the public key is registered with ``medseg nodes add``.
    """
    key = ec.generate_private_key(_CURVE)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    base = Path(out_dir) / "nodes" / site_id
    _write(base, priv, private=True, overwrite=overwrite)
    _write(base.with_suffix(".pub"), pub + f" medseg-{site_id}\n".encode(), private=False,
           overwrite=overwrite)
    return base, base.with_suffix(".pub")
