"""
The router served over TLS (C{--listen ssl:...}) with a self-signed
certificate made at test time: /health and a generation through a simulated
worker, over HTTPS, trusting only that certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import Processes
from tests.support.processes import python_module

pytestmark = pytest.mark.integration


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 (and localhost), valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_the_router_serves_https_with_a_self_signed_certificate(processes: Processes, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path)
    (worker,) = processes.workers([])
    router = processes.start(
        python_module(
            "twisted_router",
            "--listen", f"ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
            "--health-check-interval", "1",
            "--worker-urls", worker.url,
        )
    )
    assert router.url.startswith("https://127.0.0.1:")
    router.wait_for_line(r"worker 127\.0\.0\.1:\d+ is up")

    health = requests.get(f"{router.url}/health", verify=str(cert), timeout=10)
    assert health.status_code == 200 and health.json()["healthy_workers"] == 1

    reply = requests.post(
        f"{router.url}/v1/images/generations",
        json={"prompt": "a fox", "size": "256x256", "response_format": "b64_json"},
        verify=str(cert),
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["data"][0]["b64_json"]

    # Plain HTTP to the TLS port is not served, and an untrusted client refuses the router.
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(router.url.replace("https://", "http://") + "/health", timeout=10)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{router.url}/health", timeout=10)
