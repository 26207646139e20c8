"""Certificates and node keys for a secured federation, made with ``cryptography``.

A FedMER federation needs three kinds of key material:

* a certificate authority (``ca.crt``/``ca.key``) that every SuperNode trusts
  (``--root-certificates``) and the SuperLink names (``--ssl-ca-certfile``);
* the SuperLink's TLS certificate and key (``server.pem``/``server.key``), signed by that CA,
  whose subject alternative names hold every name nodes dial *and* 127.0.0.1 (the SuperLink's
  own SuperExec connects over loopback);
* one ECDSA P-384 key pair per node in OpenSSH format (``nodes/<site>`` and
  ``nodes/<site>.pub``): the public half is registered with the SuperLink
  (``flwr supernode register``), the private half never leaves the node.

These are a self-made CA for a pilot or a test. A production deployment replaces ``ca.crt``,
``server.pem`` and ``server.key`` with certificates from the hospital's or fleet's own PKI; the
node keys stay as they are (Flower's node authentication is not X.509).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "NODE_DIR",
    "SERVER_CERT",
    "SERVER_KEY",
    "FederationKeys",
    "add_node_key",
    "make_federation_keys",
    "node_key_paths",
]

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
NODE_DIR = "nodes"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class FederationKeys:
    """Where the key material of one federation lives (see the module docstring)."""

    folder: Path
    nodes: tuple[str, ...] = field(default=())

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def node_key(self, site: str) -> Path:
        """The node's private key (stays on the node)."""
        return node_key_paths(self.folder, site)[0]

    def node_public_key(self, site: str) -> Path:
        """The node's public key (registered with the SuperLink)."""
        return node_key_paths(self.folder, site)[1]


def node_key_paths(folder: Path, site: str) -> tuple[Path, Path]:
    """Private and public key file of node ``site`` under ``folder``."""
    return folder / NODE_DIR / site, folder / NODE_DIR / f"{site}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)  # ssh and grpc refuse nothing, but operators should see intent


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedMER"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _check_names(server_names: tuple[str, ...], nodes: tuple[str, ...]) -> None:
    if not server_names:
        raise ValueError(
            "server_names is empty: give the host name(s) or IPs nodes use to reach the SuperLink"
        )
    bad = [s for s in nodes if not _SITE_NAME.match(s)]
    if bad:
        raise ValueError(
            f"invalid node name(s) {bad}: 1-63 letters, digits, '.', '_', '-', not starting with a symbol"
        )
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node names must be unique, got {list(nodes)}")


def make_federation_keys(
    folder: str | Path,
    server_names: tuple[str, ...] = ("localhost",),
    nodes: tuple[str, ...] = (),
    days: int = 365,
    overwrite: bool = False,
) -> FederationKeys:
    """Create a CA, the SuperLink's certificate (SAN: ``server_names`` + 127.0.0.1) and node keys.

    Refuses to overwrite existing key material unless ``overwrite``: replacing a CA silently
    would lock every deployed node out.
    """
    folder = Path(folder)
    names = tuple(dict.fromkeys((*server_names, "127.0.0.1")))  # loopback for the SuperLink's SuperExec
    _check_names(tuple(server_names), tuple(nodes))
    keys = FederationKeys(folder, tuple(nodes))
    targets = [keys.ca_cert, keys.server_cert, keys.server_key]
    targets += [p for s in nodes for p in node_key_paths(folder, s)]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"key material already exists: {existing[:3]}; replacing it locks out every deployed node: "
            "pass overwrite (fedmer deploy keys --overwrite) only if that is what you want"
        )

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("FedMER federation CA"))
        .issuer_name(_name("FedMER federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(keys.ca_cert, ca_cert.public_bytes(pem), private=False)
    _write(folder / CA_KEY, ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(keys.server_cert, server_cert.public_bytes(pem), private=False)
    _write(keys.server_key, server_key.private_bytes(pem, pkcs8, none), private=True)
    for site in nodes:
        add_node_key(folder, site, overwrite=overwrite)
    log.info(
        "federation keys in %s: CA, SuperLink certificate for %s, %d node key pair(s)",
        folder,
        names,
        len(nodes),
    )
    return keys


def add_node_key(folder: str | Path, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """One more node: an ECDSA P-384 key pair in OpenSSH format (what Flower's node auth reads)."""
    _check_names(("x",), (site,))
    private, public = node_key_paths(Path(folder), site)
    if not overwrite and (private.exists() or public.exists()):
        raise FileExistsError(f"node key for {site!r} already exists: {private}")
    key = ec.generate_private_key(ec.SECP384R1())
    openssh = serialization.PrivateFormat.OpenSSH
    _write(
        private, key.private_bytes(serialization.Encoding.PEM, openssh, serialization.NoEncryption()), True
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(public, pub + f" fedmer-{site}\n".encode(), private=False)
    return private, public
