"""`returnfeed cert` (server.certs): the local CA and the server certificate
— SANs, key usages, name constraints, file modes, CA reuse — checked with
`cryptography` and with OpenSSL's own verifier (Python's ssl)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from server.certs import CertError, host_addresses, make_local_certificates, split_hosts

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_and_server_certificate_shape(tmp_path: Path) -> None:
    made = make_local_certificates(tmp_path, ["studio.lan", "192.168.7.20", "feeds.example.com"], days=30,
                                   include_host=False)
    ca, leaf = _load(made.ca_cert), _load(made.server_cert)
    assert made.ca_created
    # CA: EC P-256, CA:TRUE pathlen 0 (critical), signs certificates only, name-constrained.
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    nc = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted_dns = {g.value for g in nc.value.permitted_subtrees if isinstance(g, x509.DNSName)}
    assert {"local", "lan", "home.arpa", "feeds.example.com"} <= permitted_dns
    assert "com" not in permitted_dns and "example.com" not in permitted_dns
    # Leaf: names in SAN, serverAuth, signature only, the asked lifetime.
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"studio.lan", "feeds.example.com"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.7.20")]
    assert leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == \
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    leaf_ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert leaf_ku.digital_signature and not leaf_ku.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == ca.subject
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, hours=2)
    assert made.ca_fingerprint == ca.fingerprint(hashes.SHA256()).hex(":").upper()


def test_key_files_are_private(tmp_path: Path) -> None:
    made = make_local_certificates(tmp_path, ["localhost"], include_host=False)
    for key in (made.ca_key, made.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca_key.parent.stat().st_mode) == 0o700


def test_rerun_reuses_the_ca_and_renews_the_server_certificate(tmp_path: Path) -> None:
    first = make_local_certificates(tmp_path, ["studio.lan"], include_host=False)
    first_leaf = first.server_cert.read_bytes()
    second = make_local_certificates(tmp_path, ["studio.lan", "cam-router.home.arpa", "10.1.2.3"], include_host=False)
    assert not second.ca_created and second.ca_fingerprint == first.ca_fingerprint
    assert second.server_cert.read_bytes() != first_leaf
    # Outside the CA's constraints: refused, the CA untouched, --new-ca replaces it.
    with pytest.raises(CertError, match="--new-ca"):
        make_local_certificates(tmp_path, ["other.example.org"], include_host=False)
    assert make_local_certificates(tmp_path, ["studio.lan"], include_host=False).ca_fingerprint == first.ca_fingerprint
    third = make_local_certificates(tmp_path, ["other.example.org"], include_host=False, new_ca=True)
    assert third.ca_created and third.ca_fingerprint != first.ca_fingerprint


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="825"):
        make_local_certificates(tmp_path, ["localhost"], days=900, include_host=False)
    with pytest.raises(CertError, match="not a host name"):
        make_local_certificates(tmp_path, ["bad name!"], include_host=False)
    with pytest.raises(CertError, match="--hosts"):
        make_local_certificates(tmp_path, [""], include_host=False)


def test_host_addresses_skip_loopback_and_link_local() -> None:
    for addr in host_addresses():
        assert not addr.is_loopback and not addr.is_link_local


def test_split_hosts() -> None:
    names, ips = split_hosts(["Studio.LAN", " 10.0.0.1", "[fd00::2]", "*.cams.lan", "studio.lan"])
    assert names == ["studio.lan", "*.cams.lan"]
    assert ips == [ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::2")]


def _serve_once(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def run() -> None:
        with srv:
            conn, _ = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("name, ok", [("localhost", True), ("127.0.0.1", True), ("elsewhere.lan", False)])
def test_openssl_verifies_the_chain(tmp_path: Path, name: str, ok: bool) -> None:
    """OpenSSL checks the chain, the CA's name constraints and the host name."""
    made = make_local_certificates(tmp_path, ["localhost", "127.0.0.1"], include_host=False)
    port, thread = _serve_once(made.server_cert, made.server_key)
    client = ssl.create_default_context(cafile=str(made.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if ok:
            with client.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.wrap_socket(raw, server_hostname=name)
    thread.join(5)


def test_cli_prints_paths_fingerprint_and_config(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "server.cli", "cert", "--data-dir", str(tmp_path),
                          "--hosts", "studio.lan,10.9.8.7", "--days", "90"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    fp = _load(tmp_path / "tls" / "ca.crt").fingerprint(hashes.SHA256()).hex(":").upper()
    assert "local CA (created)" in out and fp in out
    assert f'tls_cert = "{(tmp_path / "tls" / "server.crt").resolve()}"' in out
    assert "studio.lan" in out and "10.9.8.7" in out
    # This host's own names and non-loopback addresses are in it by default.
    assert socket.gethostname().lower() in out
    for addr in host_addresses():
        assert str(addr) in out
    again = subprocess.run([sys.executable, "-m", "server.cli", "cert", "--data-dir", str(tmp_path), "--days", "2000"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "825" in again.stderr
