"""The development certificates in certs/ and their copies shipped in the package."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

REPO = Path(__file__).resolve().parents[1]
CERTS = REPO / "certs"
PACKAGED = REPO / "src" / "imkit" / "_devcerts"
GENERATE = CERTS / "generate.py"


def load_cert(path: Path) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(path.read_bytes())
    assert len(certs) == 1, f"{path} should hold exactly one certificate"
    return certs[0]


def load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def check_set(folder: Path) -> None:
    """Everything a generated CA + server set must satisfy."""
    ca, server = load_cert(folder / "ca.pem"), load_cert(folder / "server.pem")
    ca_key, server_key = load_key(folder / "ca.key"), load_key(folder / "server.key")

    for cert, key in ((ca, ca_key), (server, server_key)):
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert spki(cert.public_key()) == spki(key.public_key())
        assert cert.not_valid_before_utc <= now() < cert.not_valid_after_utc

    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 3650 <= ca_days <= 3653, ca_days

    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 5 * 365 <= server_days <= 5 * 366, server_days
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


def test_shipped_certs_are_valid():
    check_set(CERTS)


def test_server_pem_is_leaf_only():
    assert len(x509.load_pem_x509_certificates((CERTS / "server.pem").read_bytes())) == 1


def test_keys_are_unencrypted_pem():
    for name in ("ca.key", "server.key"):
        assert (CERTS / name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_package_copies_equal_certs_folder():
    for name in ("ca.pem", "server.pem", "server.key"):
        assert (PACKAGED / name).read_bytes() == (CERTS / name).read_bytes(), (
            f"src/imkit/_devcerts/{name} differs from certs/{name}; "
            f"regenerate with 'python certs/generate.py'"
        )


def test_ca_key_is_not_shipped_in_package():
    assert not (PACKAGED / "ca.key").exists()


def test_setup_cfg_ships_package_copies():
    text = (REPO / "setup.cfg").read_text()
    assert "[options.package_data]" in text
    assert "_devcerts/*.pem" in text and "_devcerts/*.key" in text


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args], capture_output=True, text=True
    )


def test_generate_writes_a_valid_set(tmp_path):
    result = run_generate("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    check_set(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}


def test_generate_client_certificate(tmp_path):
    assert run_generate("--out", str(tmp_path)).returncode == 0
    result = run_generate("--out", str(tmp_path), "--client", "alice")
    assert result.returncode == 0, result.stderr
    ca = load_cert(tmp_path / "ca.pem")
    client = load_cert(tmp_path / "client-alice.pem")
    key = load_key(tmp_path / "client-alice.key")
    client.verify_directly_issued_by(ca)
    assert spki(client.public_key()) == spki(key.public_key())
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The CA and server certificate are left alone.
    check_set(tmp_path)


def test_generate_client_needs_existing_ca(tmp_path):
    result = run_generate("--out", str(tmp_path / "empty"), "--client", "alice")
    assert result.returncode != 0
    assert "cannot read the CA" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_generate_rejects_path_like_client_name(tmp_path):
    result = run_generate("--out", str(tmp_path), "--client", "../evil")
    assert result.returncode != 0
    assert "bad client name" in result.stderr
