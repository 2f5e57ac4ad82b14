"""Who may call operator RPCs. The one place to change when mTLS replaces the shared token."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from nac_server.errors import NotOperator, Unauthenticated


class OperatorCheck:
    def __init__(self, admin_token: str | None) -> None:
        self._admin_token = admin_token

    def __call__(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raise unless the call presents `authorization: Bearer <admin token>`."""
        if not self._admin_token:
            raise NotOperator("operator calls are disabled: start the server with --admin-token")
        presented = next((value for key, value in metadata if key.lower() == "authorization"), None)
        if presented is None:
            raise Unauthenticated()
        scheme, _, token = str(presented).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._admin_token.encode()
        ):
            raise NotOperator("the admin token presented is not the server's")
