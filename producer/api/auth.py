"""Bearer tokens: every configured token compared in constant time, once per request."""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param

from producer.errors import Unauthorized
from producer.limits import VERIFIED_TOKEN


class BearerAuth:
    """The tokens an API accepts; with none (insecure-no-auth, refused at create_app unless
    chosen) every request is let through."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def verify(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise Unauthorized unless `credentials` carry a valid token."""
        if not self._tokens:
            return
        if request.scope.get(VERIFIED_TOKEN):
            return  # the guard compared it already: once per request, as the timing promises
        if credentials is None:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
        if not self._matches(credentials.credentials.encode()):
            raise Unauthorized("invalid bearer token")

    def accepts(self, authorization: str) -> bool:
        """Whether an Authorization header carries a valid token (parsed as HTTPBearer does)."""
        scheme, credentials = get_authorization_scheme_param(authorization)
        if scheme.lower() != "bearer" or not credentials:
            return False
        return self._matches(credentials.encode("latin-1"))

    def _matches(self, given: bytes) -> bool:
        # Compare against every token, matched or not, so timing reveals neither which
        # token nor how much of one matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(given, token)
        return matched
