"""``returnfeed cert``: a local certificate authority and a server
certificate for this host, so phones on a LAN get a secure context.

::

    <data_dir>/tls/ (0700)
      ca.crt      local CA, EC P-256, CA:TRUE pathlen:0, name-constrained
      ca.key      0600, never leaves this directory
      server.crt  EC P-256 leaf signed by the CA: SANs = this host's names
      server.key  0600        and non-loopback addresses, plus --hosts

The CA is made once and reused: running the command again renews only the
server certificate (new key, new SANs), so phones that installed the CA keep
trusting the server. ``--new-ca`` replaces it.

A phone that installs this CA would trust it for any name it could sign, so
it carries name constraints (RFC 5280 §4.2.1.10): it may sign only this
host's names, names under ``local``/``home.arpa``/``internal``/``lan``/
``localhost``, private, loopback and link-local addresses (RFC 1918, RFC 6598,
RFC 4193, RFC 4291) and the extra hosts given when it was made. A later
``--hosts`` outside them needs ``--new-ca``.

Apple's rules for TLS server certificates (support.apple.com HT210176)
decide the leaf's shape: names only in subjectAltName, extendedKeyUsage
serverAuth, at most 825 days, SHA-256 signatures.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .tls import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, tls_dir

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: HT210176: Apple platforms refuse TLS server certificates valid longer.
MAX_SERVER_DAYS = 825
DEFAULT_SERVER_DAYS = 397
CA_DAYS = 3650

#: Names a LAN uses that no public CA can issue for (RFC 6762 ``local``,
#: RFC 8375 ``home.arpa``, ICANN's ``internal``, common router ``lan``).
PRIVATE_DNS_SUFFIXES = ("local", "home.arpa", "internal", "lan", "localhost")
PRIVATE_NETWORKS: tuple[IpNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",  # RFC 6598 shared address space (carrier NAT, overlay VPNs)
    "127.0.0.0/8", "169.254.0.0/16",
    "fc00::/7",  # RFC 4193 unique local
    "::1/128", "fe80::/10",
))


class CertError(Exception):
    """The certificates cannot be made as asked; the message says why."""


@dataclass(slots=True)
class LocalCertificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    ca_created: bool
    ca_fingerprint: str
    dns_names: list[str] = field(default_factory=list)
    ip_addresses: list[str] = field(default_factory=list)
    not_after: dt.datetime | None = None


# -- what this host is called ------------------------------------------------------

def host_names() -> list[str]:
    """This machine's host name, its FQDN and its mDNS name (``name.local``,
    which iOS resolves and Android does since 12)."""
    short = socket.gethostname().strip().lower()
    names = [short] if short else []
    fqdn = socket.getfqdn().strip().lower()
    if fqdn and "." in fqdn and fqdn not in names and not fqdn.startswith("localhost"):
        names.append(fqdn)
    if short and "." not in short:
        names.append(f"{short}.local")
    return [n for n in names if _is_dns_name(n)]


def host_addresses() -> list[IpAddress]:
    """Every address of this host's interfaces except loopback and
    link-local ones (a link-local address needs a zone a URL cannot carry)."""
    import ifaddr

    out: list[IpAddress] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                addr = ipaddress.ip_address(raw)
            except ValueError:
                continue
            if addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr in out:
                continue
            out.append(addr)
    return out


def _is_dns_name(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return bool(name) and len(name) <= 253 and all(
        0 < len(label) <= 63 and all(c.isalnum() or c == "-" for c in label) and not label.startswith("-")
        and not label.endswith("-") for label in labels)


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[IpAddress]]:
    """``--hosts`` entries into DNS names and IP addresses; a wildcard
    (``*.example.lan``) is a DNS name."""
    names: list[str] = []
    ips: list[IpAddress] = []
    for raw in hosts:
        item = raw.strip().strip("[]").lower()
        if not item:
            continue
        try:
            addr = ipaddress.ip_address(item)
        except ValueError:
            bare = item[2:] if item.startswith("*.") else item
            if not _is_dns_name(bare):
                raise CertError(f"not a host name or IP address: {raw!r}") from None
            if item not in names:
                names.append(item)
            continue
        if addr not in ips:
            ips.append(addr)
    return names, ips


# -- name constraints ----------------------------------------------------------------

def _dns_permitted(name: str, bases: Sequence[str]) -> bool:
    # RFC 5280 §4.2.1.10: a DNS constraint matches the name and every name
    # made by adding labels to its left.
    name = name[2:] if name.startswith("*.") else name
    return any(name == b or name.endswith("." + b) for b in bases)


def _ip_permitted(addr: IpAddress, networks: Sequence[IpNetwork]) -> bool:
    return any(addr.version == n.version and addr in n for n in networks)


def ca_constraints(ca: x509.Certificate) -> tuple[list[str], list[IpNetwork]] | None:
    try:
        nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    dns = [g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.DNSName)]
    nets = [g.value for g in nc.permitted_subtrees or () if isinstance(g, x509.IPAddress)]
    return dns, nets  # type: ignore[return-value]


def _outside(ca: x509.Certificate, names: Sequence[str], ips: Sequence[IpAddress]) -> list[str]:
    constraints = ca_constraints(ca)
    if constraints is None:
        return []
    dns, nets = constraints
    return ([n for n in names if not _dns_permitted(n, dns)]
            + [str(a) for a in ips if not _ip_permitted(a, nets)])


# -- files ---------------------------------------------------------------------------

def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Written beside the target, then renamed over it: a server reloading
    on SIGHUP never reads half a file, and a key is never readable by others
    even for a moment (created 0600, not chmod-ed afterwards)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, ``AB:CD:…``: how iOS, Android and
    browsers show it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ca_summary(pem: bytes) -> dict[str, str]:
    """What the landing page shows about the local CA."""
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {"fingerprint_sha256": fingerprint(cert), "subject": str(cn[0].value) if cn else cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.isoformat()}


# -- issuing ---------------------------------------------------------------------------

def _new_ca(now: dt.datetime, names: Sequence[str], ips: Sequence[IpAddress]
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    host = socket.gethostname() or "localhost"
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ReturnFeed"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"ReturnFeed local CA {host} {now:%Y-%m-%d}"[:64]),
    ])
    dns = list(PRIVATE_DNS_SUFFIXES) + [n[2:] if n.startswith("*.") else n for n in names
                                        if not _dns_permitted(n, PRIVATE_DNS_SUFFIXES)]
    nets = list(PRIVATE_NETWORKS) + [ipaddress.ip_network(a) for a in ips if not _ip_permitted(a, PRIVATE_NETWORKS)]
    permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
    permitted += [x509.IPAddress(n) for n in nets]
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            # RFC 5280 §4.2.1.9: CA, and it signs end-entity certificates only.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            # RFC 5280 §4.2.1.10: "Conforming CAs MUST mark this extension as critical".
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, names: Sequence[str],
                 ips: Sequence[IpAddress], days: int, now: dt.datetime
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    # The names live in subjectAltName only (RFC 6125 §6.4.4, HT210176). A
    # common name that looked like a host name would also be checked against
    # the CA's DNS constraints by OpenSSL; this one does not.
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ReturnFeed"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "ReturnFeed server")])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names] + [x509.IPAddress(a) for a in ips]
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # ECDHE-ECDSA: the key signs the handshake, it never enciphers.
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def make_local_certificates(data_dir: Path, extra_hosts: Iterable[str] = (), *, days: int = DEFAULT_SERVER_DAYS,
                            new_ca: bool = False, include_host: bool = True,
                            now: dt.datetime | None = None) -> LocalCertificates:
    """Make (or reuse) the local CA and issue a fresh server certificate for
    this host's names and addresses plus ``extra_hosts``."""
    if not 1 <= days <= MAX_SERVER_DAYS:
        raise CertError(f"--days must be between 1 and {MAX_SERVER_DAYS} (Apple devices refuse longer)")
    now = now or dt.datetime.now(dt.timezone.utc)
    names, ips = split_hosts(extra_hosts)
    if include_host:
        for n in host_names():
            if n not in names:
                names.append(n)
        for a in host_addresses():
            if a not in ips:
                ips.append(a)
    if not names and not ips:
        raise CertError("no host names or addresses to certify; give some with --hosts")
    folder = tls_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca_path, ca_key_path = folder / CA_CERT, folder / CA_KEY
    ca_created = False
    if ca_path.is_file() and ca_key_path.is_file() and not new_ca:
        try:
            ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise CertError(f"{ca_path} or {ca_key_path} is not readable ({exc}); use --new-ca") from None
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca.public_key():
            raise CertError(f"{ca_key_path} is not the key of {ca_path}; use --new-ca")
        if ca.not_valid_after_utc < now + dt.timedelta(days=days):
            raise CertError(f"the local CA expires {ca.not_valid_after_utc:%Y-%m-%d}, before this certificate "
                            "would; use --new-ca (phones must then install the new CA)")
        outside = _outside(ca, names, ips)
        if outside:
            raise CertError(f"the local CA may not sign {', '.join(outside)} (its name constraints were fixed "
                            "when it was made); use --new-ca (phones must then install the new CA)")
    else:
        ca, ca_key = _new_ca(now, names, ips)
        _write_private(ca_key_path, _pem_key(ca_key), 0o600)
        _write_private(ca_path, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        ca_created = True
    cert, key = _server_cert(ca, ca_key, names, ips, days, now)
    server_path, server_key_path = folder / SERVER_CERT, folder / SERVER_KEY
    # Key first: a reload that reads the new certificate with the old key
    # refuses the pair and keeps serving the old one until the next SIGHUP.
    _write_private(server_key_path, _pem_key(key), 0o600)
    # The leaf alone: a client either has the CA installed or fails anyway.
    _write_private(server_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return LocalCertificates(ca_path, ca_key_path, server_path, server_key_path, ca_created, fingerprint(ca),
                             list(names), [str(a) for a in ips], cert.not_valid_after_utc)
