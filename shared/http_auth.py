"""Who may change state through skipfleet's HTTP endpoints (the coordinator's operator API and a
process fleet's control URL), and the bearer-token files they and their clients share.

The rules, the same for both servers:
- a request that can change state (anything but GET/HEAD) needs `Authorization: Bearer TOKEN`,
  else 401 with a JSON error that says where the token is;
- and a JSON body (`Content-Type: application/json`), else 415: a browser sends a cross-origin
  POST without a preflight only as text/plain, form-urlencoded or multipart, so a page the
  operator visits cannot make one (CSRF), and it cannot set the Authorization header either;
- reads are open to loopback clients and need the token from anywhere else.

Tokens live in files (mode 0600), never in the environment or on a command line, where `ps`
shows them; they are compared in constant time. Standard library only: the agent's side of the
package may import this module.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

TOKEN_BYTES = 32  # 256 bits, as 43 URL-safe characters
READ_METHODS = frozenset({"GET", "HEAD"})
JSON_CONTENT_TYPE = "application/json"


class TokenFileError(ValueError):
    """The token file cannot be read or made: misconfiguration, said with the path."""


def ensure_token_file(path: Path) -> str:
    """The token in `path`, made there (mode 0600, a fresh random token) if the file is absent."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.exists():
            return read_token_file(path)
        raise TokenFileError(f"cannot create the token file {path}: a parent is a file") from None
    except OSError as err:
        raise TokenFileError(f"cannot create the token file {path}: {err.strerror}") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def read_token_file(path: str | Path) -> str:
    """The token in an existing file: its first line, stripped; TokenFileError if unusable."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise TokenFileError(f"cannot read the token file {path}: {err.strerror}") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16 or any(c.isspace() for c in token):
        raise TokenFileError(f"the token file {path} must hold one token of 16+ characters")
    return token


def bearer_header(token: str | None) -> dict[str, str]:
    """The request headers a client adds: none without a token."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(frozen=True)
class Refusal:
    status: HTTPStatus
    message: str


class RequestGuard:
    """Decides, before any routing, whether a request may go on (None) or is refused."""

    def __init__(self, token: str, where: str) -> None:
        if not token:
            raise ValueError("a RequestGuard needs a token")
        self._token = token.encode()
        self._where = where  # how an operator finds the token, for the 401 message

    def check(
        self, method: str, client_host: str, authorization: str | None, content_type: str | None
    ) -> Refusal | None:
        reading = method.upper() in READ_METHODS
        if not (reading and is_loopback(client_host)) and not self._authorized(authorization):
            what = "reading from another host" if reading else f"{method} (it changes state)"
            return Refusal(
                HTTPStatus.UNAUTHORIZED,
                f"{what} needs 'Authorization: Bearer TOKEN'; the token is {self._where}",
            )
        if not reading and _media_type(content_type) != JSON_CONTENT_TYPE:
            return Refusal(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"{method} needs 'Content-Type: {JSON_CONTENT_TYPE}' (got {content_type!r})",
            )
        return None

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_request(guard: RequestGuard, handler: BaseHTTPRequestHandler) -> Refusal | None:
    """guard.check() for an http.server request handler (its command, peer and headers)."""
    headers = handler.headers
    return guard.check(
        handler.command,
        handler.client_address[0],
        headers.get("Authorization"),
        headers.get("Content-Type"),
    )
