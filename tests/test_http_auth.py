"""The token files and the request guard that lock the coordinator's API and the fleet control
URL."""

from __future__ import annotations

import stat
from http import HTTPStatus

import pytest

from shared.http_auth import (
    RequestGuard,
    TokenFileError,
    bearer_header,
    ensure_token_file,
    is_loopback,
    read_token_file,
)

TOKEN = "a-token-of-at-least-16-chars-0123"
JSON = "application/json"


def test_a_token_is_made_once_with_mode_0600_and_read_back(tmp_path):
    path = tmp_path / "state" / "api-token"
    token = ensure_token_file(path)
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token_file(path) == token == read_token_file(path)
    assert ensure_token_file(tmp_path / "other") != token  # random, not derived


def test_an_operators_token_file_is_used_as_it_is(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert ensure_token_file(path) == TOKEN


@pytest.mark.parametrize("content", ["", "short", "two words in a token file\n"])
def test_an_unusable_token_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=str(path)):
        read_token_file(path)


def test_a_missing_token_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenFileError, match="cannot read"):
        read_token_file(tmp_path / "absent")


def test_a_token_file_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(TokenFileError, match="cannot create"):
        ensure_token_file(tmp_path / "not-a-dir" / "api-token")


def guard() -> RequestGuard:
    return RequestGuard(TOKEN, "in /var/lib/x/api-token")


def test_state_changes_need_the_token_from_anywhere():
    auth = bearer_header(TOKEN)["Authorization"]
    for host in ("127.0.0.1", "::1", "10.0.0.7"):
        refusal = guard().check("POST", host, None, JSON)
        assert refusal.status == HTTPStatus.UNAUTHORIZED
        assert "/var/lib/x/api-token" in refusal.message  # says where the token is
        assert guard().check("POST", host, "Bearer wrong-token-0123456789", JSON).status == 401
        assert guard().check("POST", host, f"Basic {TOKEN}", JSON).status == 401
        assert guard().check("POST", host, auth, JSON) is None
        assert guard().check("POST", host, auth, "application/json; charset=utf-8") is None


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_state_change_must_be_json_even_with_the_token(content_type):
    """The three content types a browser sends cross-origin without asking first (CSRF)."""
    refusal = guard().check("POST", "127.0.0.1", f"Bearer {TOKEN}", content_type)
    assert refusal.status == HTTPStatus.UNSUPPORTED_MEDIA_TYPE and JSON in refusal.message


def test_reads_are_open_on_loopback_and_need_the_token_from_elsewhere():
    assert guard().check("GET", "127.0.0.1", None, None) is None
    assert guard().check("GET", "::ffff:127.0.0.1", None, None) is None
    refusal = guard().check("GET", "192.168.1.20", None, None)
    assert refusal.status == HTTPStatus.UNAUTHORIZED and "another host" in refusal.message
    assert guard().check("GET", "192.168.1.20", f"Bearer {TOKEN}", None) is None


def test_loopback_is_an_address_not_a_name():
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1")
    assert not is_loopback("localhost.evil.example") and not is_loopback("0.0.0.0")
    assert not is_loopback("10.0.0.1") and not is_loopback("")


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "10.0.0.7:80"])
def test_an_open_read_from_loopback_through_a_foreign_name_needs_the_token(host):
    """DNS rebinding: a page from attacker.example re-pointed at 127.0.0.1 is a loopback peer."""
    refusal = guard().check("GET", "127.0.0.1", None, None, host)
    assert refusal.status == HTTPStatus.UNAUTHORIZED and host in refusal.message
    assert guard().check("GET", "127.0.0.1", f"Bearer {TOKEN}", None, host) is None


@pytest.mark.parametrize(
    "host", [None, "localhost", "localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST."]
)
def test_an_open_read_from_loopback_may_name_localhost_or_a_loopback_address(host):
    assert guard().check("GET", "127.0.0.1", None, None, host) is None
