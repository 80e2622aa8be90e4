"""The push bridges' credentials, loaded and checked once, by the bridge at start and by
``check-config`` before the service starts: one function per kind of key, so a key that
the bridge would refuse is found by the same code before it is needed.

Each loader raises :class:`BridgeConfigError` naming the key (``bridges.fcm.service_account_file:
…``); :func:`problems` runs every loader of the enabled bridges and returns the problems
as (key, message) without starting anything (a missing VAPID key is not one: the bridge
creates it at start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridges.base import BridgeConfigError

if TYPE_CHECKING:
    from bridges.apns import ApnsSecrets
    from bridges.fcm import FcmSecrets
    from bridges.wns import WnsSecrets
    from gateway.config import ApnsBridge, Config, Secrets, WebPushBridge, WnsBridge

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def fcm_credentials(secrets: FcmSecrets | None, key: str = "bridges.fcm") -> Any:
    """The service account's signing credentials (google-auth parses the private key).

    ``key``: the section the problems are named under (an app's: ``bridges.fcm.apps.<name>``)."""
    from google.oauth2 import service_account

    if secrets is None or not secrets.service_account_info or not secrets.project_id:
        raise BridgeConfigError(f"{key}.service_account_file: no service account loaded")
    try:
        return service_account.Credentials.from_service_account_info(dict(secrets.service_account_info),
                                                                      scopes=[FCM_SCOPE])
    except (ValueError, KeyError, TypeError) as exc:
        raise BridgeConfigError(
            f"{key}.service_account_file: unusable service account ({type(exc).__name__})") from None


def apns_signing_key(cfg: ApnsBridge, secrets: ApnsSecrets | None, key: str = "bridges.apns") -> Any:
    """The .p8 token-signing key (P-256), or None with certificate auth."""
    if cfg.cert_file is not None and str(cfg.cert_file):
        return None
    if secrets is None or secrets.signing_key is None:
        raise BridgeConfigError(f"{key}.key_file: no signing key loaded")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        signing = load_pem_private_key(secrets.signing_key.get_secret_value().encode(), None)
    except (ValueError, TypeError):
        raise BridgeConfigError(f"{key}.key_file: not a readable PEM private key") from None
    if not isinstance(signing, ec.EllipticCurvePrivateKey) or signing.curve.name != "secp256r1":
        raise BridgeConfigError(f"{key}.key_file: not a P-256 (ES256) key")
    return signing


def apns_tls(cfg: ApnsBridge, key: str = "bridges.apns") -> None:
    """The CA file and, with certificate auth, the client certificate and its key load."""
    from bridges import _http

    cert = cfg.cert_file if cfg.cert_file is not None and str(cfg.cert_file) else None
    try:
        _http.tls_context(cfg.ca_file, cert, cfg.cert_key_file if cert else None)
    except (OSError, ValueError) as exc:
        raise BridgeConfigError(f"{key}.cert_file: cannot load TLS material ({type(exc).__name__})") from None


def wns_secret(cfg: WnsBridge, secrets: WnsSecrets | None, key: str = "bridges.wns") -> str:
    if secrets is None or not cfg.client_id or not secrets.client_secret.get_secret_value().strip():
        raise BridgeConfigError(f"{key}.client_secret_file: no client secret loaded")
    return secrets.client_secret.get_secret_value()


def vapid_key(cfg: WebPushBridge, create: bool = True, key: str = "bridges.webpush") -> Any:
    """The VAPID signing key (P-256); created when missing if ``create``."""
    from gateway import vapid

    path = cfg.vapid_private_key_file
    if not create and not path.exists():
        return None
    try:
        return vapid.load_or_create(path)
    except (OSError, ValueError, TypeError) as exc:
        raise BridgeConfigError(
            f"{key}.vapid_private_key_file: unusable key ({type(exc).__name__})") from None


def problems(cfg: Config, secrets: Secrets) -> list[tuple[str, str]]:
    """What each enabled push bridge (each app of one too) would refuse at start, as (key, message)."""
    from bridges.registry import bridge_sections

    checks: list[Any] = []
    for b in bridge_sections(cfg):
        s, k, got = b.section, b.key, secrets.bridge(b.name)
        if b.platform == "fcm":
            checks.append(lambda got=got, k=k: fcm_credentials(got, k))
        elif b.platform == "apns":
            checks += [lambda s=s, got=got, k=k: apns_signing_key(s, got, k), lambda s=s, k=k: apns_tls(s, k)]
        elif b.platform == "wns":
            checks.append(lambda s=s, got=got, k=k: wns_secret(s, got, k))
        elif b.platform == "webpush":
            checks.append(lambda s=s, k=k: vapid_key(s, create=False, key=k))
    out = []
    for check in checks:
        try:
            check()
        except BridgeConfigError as exc:
            name, _, msg = str(exc).partition(": ")
            out.append((name, msg))
    return out
