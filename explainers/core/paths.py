"""Paths and URLs as messages may show them: without what may hold credentials (a query, user info).
Here, in the lowest layer, because methods that read files (abele's autoencoder, a background
file) report on paths too; transforms.io.storage uses the same."""
from __future__ import annotations

import re

# A query (?key=value..., a presigned signature, an Azure SAS token) or a fragment with a value: from
# the first ? or # followed by a name and '=' before any '/' (a glob's ? is followed by no '=').
_QUERY = re.compile(r"[?#][^/?#=]*=.*$", re.DOTALL)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def shown(url: str) -> str:
    """A path or URL as a message may print it: without a query or user info, which may hold
    credentials (a glob's ``?`` stays)."""
    return _USERINFO.sub(r"\1", _QUERY.sub("", str(url)))


def has_query(url: str) -> bool:
    """Whether a path or URL carries a query (?key=value): a presigned signature, a SAS token."""
    return bool(_QUERY.search(str(url)))


def unquoted(text: str, url: str) -> str:
    """``text`` (an error's message) with ``url``, its query, and each value of the query wherever
    it appears alone (a client may quote the URL re-encoded), replaced by what ``shown`` keeps."""
    url = str(url)
    text = str(text).replace(url, shown(url))
    query = _QUERY.search(url)
    if query:
        text = text.replace(query.group(0), "")
        for part in re.split(r"[?#&;]", query.group(0)):
            value = part.partition("=")[2]
            if len(value) >= 4:
                text = text.replace(value, "<redacted>")
    return text
