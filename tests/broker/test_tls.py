"""TLS listeners (``tls`` and ``wss``) with ``require_client_cert``, certificates from trustme."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from gateway.broker.embedded import EmbeddedBroker, InternalCredentials
from tests.broker.helpers import Paho, broker_config, until
from tests.support import free_port


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("plc-3@site-t")
    out = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key",
           "client": tmp_path / "client.pem"}
    ca.cert_pem.write_to_path(out["ca"])
    server.cert_chain_pems[0].write_to_path(out["cert"])
    server.private_key_pem.write_to_path(out["key"])
    client.private_key_and_cert_chain_pem.write_to_path(out["client"])
    other = trustme.CA().issue_cert("intruder")  # a certificate from a CA the broker does not trust
    out["stranger"] = tmp_path / "stranger.pem"
    other.private_key_and_cert_chain_pem.write_to_path(out["stranger"])
    return out


async def test_tls_and_wss_listeners_require_client_certificates(tmp_path, pki):
    plain, tls, wss = free_port(), free_port(), free_port()
    files = {"certfile": str(pki["cert"]), "keyfile": str(pki["key"]), "cafile": str(pki["ca"]),
             "require_client_cert": True, "allow_anonymous": True, "anonymous_role": "admin"}
    cfg = broker_config(tmp_path, plain, broker={"listeners": [
        {"name": "local", "type": "tcp", "bind": f"127.0.0.1:{plain}", "allow_anonymous": True,
         "anonymous_role": "admin"},
        {"name": "tls", "type": "tls", "bind": f"127.0.0.1:{tls}", **files},
        {"name": "wss", "type": "wss", "bind": f"127.0.0.1:{wss}", **files},
    ]})
    broker = EmbeddedBroker(cfg, InternalCredentials.generate())
    await broker.start()
    try:
        sub = await Paho(plain, "sub").connect()
        await sub.subscribe("secure/#", 1)
        good = {"ca_certs": str(pki["ca"]), "certfile": str(pki["client"])}
        for port, transport in ((tls, "tcp"), (wss, "websockets")):
            ok = await Paho(port, f"ok-{transport}", transport=transport, tls=good).connect()
            await ok.publish(f"secure/{transport}", b"over tls", 1)
            await ok.stop()
            for bad in ({"ca_certs": str(pki["ca"])},                                  # no client cert
                        {"ca_certs": str(pki["ca"]), "certfile": str(pki["stranger"])}):  # untrusted one
                c = Paho(port, "refused", transport=transport, tls=bad)
                try:
                    await c.connect(expect_ok=False)
                except (ssl.SSLError, OSError):
                    pass  # refused during the handshake (TLS 1.2 style)
                else:  # TLS 1.3: the server checks the certificate after the client's handshake
                    assert c.connack is None and c.disconnected
                c.client.loop_stop()
        await until(lambda: len(sub.messages) == 2)
        assert sorted(m.topic for m in sub.messages) == ["secure/tcp", "secure/websockets"]
        await sub.stop()
    finally:
        await broker.stop()


async def test_tls_listener_without_client_certificate_requirement(tmp_path, pki):
    """Without require_client_cert (and no cafile) a server-authenticated TLS client gets in."""
    port = free_port()
    cfg = broker_config(tmp_path, port, broker={"url": f"mqtts://127.0.0.1:{port}", "listeners": [
        {"name": "tls", "type": "tls", "bind": f"127.0.0.1:{port}", "certfile": str(pki["cert"]),
         "keyfile": str(pki["key"]), "allow_anonymous": True, "anonymous_role": "admin"}]})
    broker = EmbeddedBroker(cfg, InternalCredentials.generate())
    await broker.start()
    try:
        ok = await Paho(port, "no-client-cert", tls={"ca_certs": str(pki["ca"])}).connect()
        await ok.stop()
    finally:
        await broker.stop()
