"""API keys: who may call ``/v1`` and who owns what.

Keys come from ``OBATCH_API_KEYS`` (comma-separated) and/or ``OBATCH_API_KEYS_FILE`` (one per line). A key is
never stored or logged: requests are matched by the key's SHA-256, and the owner recorded on files and batches is
a short id derived from that hash. With no key configured, every caller is anonymous and sees everything (which is
why ``obatch serve`` then binds only loopback unless told otherwise).
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.rate_limit import get_remote_address
from litestar.types import ASGIApp

from obatch import errors
from obatch.config import Settings

PUBLIC_PATHS = ["^/health$", "^/schema"]


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(key: str) -> str:
    """The owner id stored for a key: derived from its hash, useless for finding the key."""
    return "key_" + digest(digest(key))[:24]


def load_keys(settings: Settings) -> dict[str, str]:
    """``{sha256(key): owner}`` for every configured key (empty: authentication is off)."""
    keys: list[str] = []
    if settings.api_keys is not None:
        keys += settings.api_keys.get_secret_value().split(",")
    if settings.api_keys_file is not None:
        path = Path(settings.api_keys_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise errors.ConfigError(f"Cannot read the API keys file {path}: {exc.strerror}") from exc
        keys += [line.split("#", 1)[0] for line in text.splitlines()]
    return {digest(k): owner_of(k) for k in (k.strip() for k in keys) if k}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiKeyAuth(AbstractAuthenticationMiddleware):
    """Bearer-key authentication; ``request.user`` is the owner id (None when authentication is off)."""

    def __init__(self, app: ASGIApp, keys: dict[str, str]) -> None:
        super().__init__(app, exclude=PUBLIC_PATHS, scopes={ScopeType.HTTP})
        self.keys = keys

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        if not self.keys:
            return AuthenticationResult(user=None, auth=None)
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException("You didn't provide an API key: send 'Authorization: Bearer <key>'.")
        owner = self.keys.get(digest(token.strip()))
        if owner is None:
            raise NotAuthorizedException("Incorrect API key provided.")
        return AuthenticationResult(user=owner, auth=None)


def rate_limit_identity(request: Any) -> str:
    """Rate limits count per key (its owner id), or per client address when authentication is off."""
    user = request.scope.get("user")
    return str(user) if user else get_remote_address(request)
