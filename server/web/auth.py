"""API keys: ``Authorization: Bearer <key>`` to a principal.

The principal is a stable, non-secret name derived from the key, so logs and
session keys never hold the key itself."""

from __future__ import annotations

import hashlib
import hmac

import attrs

from .errors import CLOSE_CONNECTION, ApiError

# Authentication happens before the body is read, hence the close.
CHALLENGE = {"WWW-Authenticate": "Bearer", **CLOSE_CONNECTION}


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme
    in any case), or ``None`` for no header, another scheme or no token."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def principal_of(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@attrs.frozen
class KeyRing:
    keys: tuple[str, ...] = attrs.field(validator=attrs.validators.min_len(1))

    def authenticate(self, authorization: str | None) -> str:
        """The principal for an ``Authorization`` header, or 401."""
        presented = bearer_token(authorization)
        if presented is None:
            raise ApiError(
                401, "unauthorized", "Send 'Authorization: Bearer <api key>'.", headers=CHALLENGE
            )
        # Compare against every key, each in constant time, so timing tells
        # neither which key nor how much of one matched.
        matched = None
        for key in self.keys:
            if hmac.compare_digest(presented.encode(), key.encode()):
                matched = key
        if matched is None:
            raise ApiError(401, "unauthorized", "The API key is not valid.", headers=CHALLENGE)
        return principal_of(matched)
