"""API keys: who may call ``/v1`` and who owns what.

Keys come from ``OBATCH_API_KEYS`` (comma-separated) and/or ``OBATCH_API_KEYS_FILE`` (one per line). A key is
never stored or logged: requests are matched by the key's SHA-256 (compared in constant time), and the owner
recorded on files and batches is a short id derived from that hash. With no key configured, every caller is
anonymous and sees everything (which is why ``obatch serve`` then binds only loopback unless told otherwise).

Keys in ``OBATCH_ADMIN_KEYS`` are keys too, and their holders also see what spans tenants (global ``/metrics``, the
host details of benchmark runs, the engine hosts and addresses in ``/health``). ``/health`` answers without a key
(up or down only); a key sent there is checked like anywhere else. Failed authentications are counted per client
address: past ``auth_failures_per_minute`` that address is answered 429 until the minute is over, whatever key it
sends.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.exceptions import NotAuthorizedException, TooManyRequestsException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.rate_limit import RateLimitMiddleware, get_remote_address
from litestar.types import ASGIApp

from obatch import errors
from obatch.config import Settings

PUBLIC_PATHS = ["^/schema"]
OPEN_PATHS = frozenset({"/health"})  # answered without a key too (less is said then); a key sent is checked
ADMIN = "admin"  # ``request.auth`` of an admin key (and of everyone when authentication is off)
ANONYMOUS = "anonymous"  # ``request.auth`` of a request to an open path that sent no key


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(key: str) -> str:
    """The owner id stored for a key: derived from its hash, useless for finding the key."""
    return "key_" + digest(digest(key))[:24]


def _admin_keys(settings: Settings) -> list[str]:
    raw = settings.admin_keys.get_secret_value() if settings.admin_keys is not None else ""
    return [k.strip() for k in raw.split(",") if k.strip()]


def load_admins(settings: Settings) -> frozenset[str]:
    """The owner ids of the admin keys."""
    return frozenset(owner_of(k) for k in _admin_keys(settings))


def load_keys(settings: Settings) -> dict[str, str]:
    """``{sha256(key): owner}`` for every configured key, admin keys included (empty: authentication is off)."""
    keys: list[str] = _admin_keys(settings)
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


class FailureLimiter:
    """Failed authentications per client address, in fixed one-minute windows (all counts drop when a window
    ends, so memory holds at most one minute of addresses)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute, self.clock = per_minute, clock
        self.started = clock()
        self.counts: dict[str, int] = {}

    def _roll(self) -> float:
        now = self.clock()
        if now - self.started >= 60:
            self.started, self.counts = now, {}
        return now

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        now = self._roll()
        if self.per_minute and self.counts.get(address, 0) >= self.per_minute:
            return max(1, math.ceil(self.started + 60 - now))
        return None

    def failed(self, address: str) -> None:
        self._roll()
        self.counts[address] = self.counts.get(address, 0) + 1


class ApiKeyAuth(AbstractAuthenticationMiddleware):
    """Bearer-key authentication; ``request.user`` is the owner id (None when authentication is off) and
    ``request.auth`` is ``ADMIN`` for an admin key (and for everyone when authentication is off)."""

    def __init__(self, app: ASGIApp, keys: dict[str, str], admins: frozenset[str] = frozenset(),
                 failures: FailureLimiter | None = None) -> None:
        super().__init__(app, exclude=PUBLIC_PATHS, scopes={ScopeType.HTTP})
        self.keys, self.admins = keys, admins
        self.failures = failures or FailureLimiter(0)

    def _owner(self, token: str) -> str | None:
        """The key's owner, comparing its hash with every known one in constant time (no early exit)."""
        wanted = digest(token).encode()
        found = None
        for known, owner in self.keys.items():
            if hmac.compare_digest(known.encode(), wanted):
                found = owner
        return found

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        if not self.keys:
            return AuthenticationResult(user=None, auth=ADMIN)
        if connection.scope["path"] in OPEN_PATHS and "authorization" not in connection.headers:
            return AuthenticationResult(user=None, auth=ANONYMOUS)
        address = get_remote_address(connection)  # type: ignore[arg-type]
        wait = self.failures.retry_after(address)
        if wait is not None:
            raise TooManyRequestsException(detail="Too many failed authentications from this address.",
                                           headers={"RateLimit-Reset": str(wait)})
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.failures.failed(address)
            raise NotAuthorizedException("You didn't provide an API key: send 'Authorization: Bearer <key>'.")
        owner = self._owner(token.strip())
        if owner is None:
            self.failures.failed(address)
            raise NotAuthorizedException("Incorrect API key provided.")
        return AuthenticationResult(user=owner, auth=ADMIN if owner in self.admins else None)


class AddressRateLimit(RateLimitMiddleware):
    """Litestar's rate limiter keyed by client address and placed before authentication, so unauthenticated
    traffic (wrong keys included) is limited too; its own class name keeps its counts apart from the per-key
    limiter's in the shared store."""


def is_admin(scope: Any) -> bool:
    return bool(scope.get("auth") == ADMIN)


def is_anonymous(scope: Any) -> bool:
    return bool(scope.get("auth") == ANONYMOUS)


def rate_limit_identity(request: Any) -> str:
    """Rate limits count per key (its owner id), or per client address when authentication is off."""
    user = request.scope.get("user")
    return str(user) if user else get_remote_address(request)
