#!/usr/bin/env python3
"""(Re)generate imkit's development TLS certificates.

For development and tests only: the keys are public in the repository, so
anything signed by this CA must never be trusted outside a developer machine.

Usage, from anywhere::

    python certs/generate.py                  # new CA, server and client-bot certs, refresh package copies
    python certs/generate.py --client alice   # client-alice.pem/.key signed by the existing CA
    python certs/generate.py --out DIR        # write a fresh CA + server set to DIR (package copies untouched)
    python certs/generate.py --out DIR --server-days 80   # ... with a short-lived server certificate

Writes into the certs/ folder next to this script (or --out DIR):

- ``ca.pem`` / ``ca.key``: a self-signed CA, EC P-256, valid 10 years.
- ``server.pem`` / ``server.key``: a server certificate for DNS:localhost,
  IP:127.0.0.1 and IP:::1, serverAuth only, EC P-256, valid ~5 years.
  ``server.pem`` holds the leaf only: the chain is the CA itself, which every
  client must already hold as its trust root, so sending it is useless.
- ``client-NAME.pem`` / ``client-NAME.key`` (with ``--client NAME``): a
  clientAuth certificate with CN=NAME for mutual-TLS work.
- ``client-bot.pem`` / ``client-bot.key``: written along with a new CA in the
  default folder only, the client certificate of user "bot" that the
  mutual-TLS tests and examples use (``--tls-client-ca certs/ca.pem`` on the
  server; the user is the certificate's common name).

When writing to the default folder it also copies ca.pem, server.pem and
server.key into src/imkit/_devcerts/, the fallback that ships inside the
package (so ``twistd -n imkit`` works outside the repository too).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
PACKAGE_COPY_DIR = HERE.parent / "src" / "imkit" / "_devcerts"
PACKAGE_COPY_FILES = ("ca.pem", "server.pem", "server.key")

CA_DAYS = 3650
SERVER_DAYS = 1826
CLIENT_DAYS = 1826
# Backdate validity a little so that a peer whose clock is slightly behind
# does not reject a freshly generated certificate as "not yet valid".
BACKDATE = datetime.timedelta(minutes=5)

ORG = "imkit development (DO NOT TRUST)"
SERVER_DNS = ("localhost",)
SERVER_IPS = ("127.0.0.1", "::1")
# Client certificates written with a new CA into the default folder.
DEFAULT_CLIENTS = ("bot",)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically so a crash never leaves a half-written key or cert."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    print(f"wrote {path}")


def make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = _name("imkit development CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDSA keys only sign (ECDHE does the key agreement), so
            # digitalSignature is the only usage a TLS leaf needs.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def make_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    san = x509.SubjectAlternativeName(
        [x509.DNSName(d) for d in SERVER_DNS]
        + [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_IPS]
    )
    return _make_leaf(
        ca_key, ca_cert, now, "localhost", days, ExtendedKeyUsageOID.SERVER_AUTH, san
    )


def make_client(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    now: datetime.datetime,
    name: str,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return _make_leaf(
        ca_key, ca_cert, now, name, CLIENT_DAYS, ExtendedKeyUsageOID.CLIENT_AUTH, None
    )


def _load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    except OSError as e:
        raise SystemExit(
            f"cannot read the CA in {out}: {e.strerror}; "
            f"run 'python {sys.argv[0]} --out {out}' first"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{out / 'ca.key'} is not an EC key; regenerate the CA")
    return key, cert


def _write_client(out: Path, ca_key, ca_cert, now: datetime.datetime, name: str) -> None:
    key, cert = make_client(ca_key, ca_cert, now, name)
    _write(out / f"client-{name}.key", _key_pem(key), private=True)
    _write(out / f"client-{name}.pem", _cert_pem(cert))


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= SERVER_DAYS:
        raise argparse.ArgumentTypeError(f"bad number of days {text!r}: use 1 to {SERVER_DAYS}")
    return int(text)


def _valid_client_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise argparse.ArgumentTypeError(
            f"bad client name {name!r}: use letters, digits, '-', '_' or '.'"
        )
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate imkit's development CA and certificates "
        "(development and tests only, never production)."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory to write to (default: the certs/ folder of the repository; "
        "only then are the package copies in src/imkit/_devcerts refreshed)",
    )
    parser.add_argument(
        "--client",
        metavar="NAME",
        type=_valid_client_name,
        help="only write client-NAME.pem/.key (clientAuth, CN=NAME) signed by the "
        "existing CA in the output directory, for mutual-TLS work",
    )
    parser.add_argument(
        "--server-days",
        metavar="N",
        type=_days,
        default=SERVER_DAYS,
        help=f"validity of the server certificate in days (default {SERVER_DAYS}; "
        "Mozilla's profiles want at most 90 for modern, 366 for intermediate)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out if args.out is not None else HERE
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)

    if args.client:
        ca_key, ca_cert = _load_ca(out)
        _write_client(out, ca_key, ca_cert, now, args.client)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(now)
    server_key, server_cert = make_server(ca_key, ca_cert, now, args.server_days)
    _write(out / "ca.key", _key_pem(ca_key), private=True)
    _write(out / "ca.pem", _cert_pem(ca_cert))
    _write(out / "server.key", _key_pem(server_key), private=True)
    _write(out / "server.pem", _cert_pem(server_cert))

    if args.out is None:
        # The old client certificates no longer chain to the new CA.
        for name in DEFAULT_CLIENTS:
            _write_client(out, ca_key, ca_cert, now, name)
        PACKAGE_COPY_DIR.mkdir(parents=True, exist_ok=True)
        for name in PACKAGE_COPY_FILES:
            shutil.copyfile(out / name, PACKAGE_COPY_DIR / name)
            print(f"copied {name} to {PACKAGE_COPY_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
