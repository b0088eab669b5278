"""medseg certs: a CA, a SAN-bearing server certificate, Flower-readable node keys."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from medseg_core.errors import ConfigError
from server.certs import create_ca_and_server, create_node_keys


def test_server_certificate_is_signed_by_the_ca_and_names_its_sans(tmp_path: Path) -> None:
    p = create_ca_and_server(tmp_path, sans=["aggregator.example.org", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if not
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["aggregator.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (p.ca_key, p.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_node_keys_load_with_the_loaders_flower_uses(tmp_path: Path) -> None:
    priv, pub = create_node_keys(tmp_path, "hospital-a")
    key = load_ssh_private_key(priv.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_existing_keys_are_never_overwritten_silently(tmp_path: Path) -> None:
    create_node_keys(tmp_path, "h")
    with pytest.raises(ConfigError, match="refusing to overwrite.*--force"):
        create_node_keys(tmp_path, "h")
    create_node_keys(tmp_path, "h", overwrite=True)


def test_server_certificate_needs_a_san(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one --san"):
        create_ca_and_server(tmp_path, sans=[])


def test_medseg_certs_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.cli import main

    assert main(["certs", "--out", str(tmp_path), "--san", "127.0.0.1", "--node", "a",
                 "--node", "b"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert {p.name for p in (tmp_path / "nodes").iterdir()} == {"a", "a.pub", "b", "b.pub"}
    assert main(["certs", "--out", str(tmp_path), "--node", "a"]) == 2  # exists: refused
    assert "refusing to overwrite" in capsys.readouterr().err
