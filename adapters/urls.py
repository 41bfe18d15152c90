"""URLs as they may be shown: logs, /healthz and error messages never carry a secret."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SECRET_KEYS = ("password", "token", "secret", "seed", "nkey")
"""Query parameters whose values `redact` masks (any key that contains one of these)."""
TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
"""Schemes whose URL user, given without a password, is an auth token."""


def redact(url: str) -> str:
    """A store or bus URL fit to log or show: its password (or a NATS token given as its user) and
    every secret query value replaced by `***`."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    elif parts.username and parts.scheme in TOKEN_SCHEMES:
        parts = parts._replace(netloc=f"***@{host}")
    if parts.query:
        query = "&".join(
            f"{key}=***" if any(word in key.lower() for word in SECRET_KEYS) else f"{key}{sep}{value}"
            for key, sep, value in (pair.partition("=") for pair in parts.query.split("&"))
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)
