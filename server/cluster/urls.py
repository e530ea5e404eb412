"""Redis URLs as they may be shown: in error and log messages the
password (the URL's userinfo) never appears."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redacted(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` (a user
    name alone is kept); a URL that cannot be parsed is shown as ``<redis url>``."""
    try:
        parts = urlsplit(url)
        password = parts.password
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "<redis url>"
    if password is None:
        return url
    netloc = f"{parts.username or ''}:***@{host or ''}"
    if port is not None:
        netloc += f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))
