"""permessage-deflate negotiation (RFC 7692 §5, §7.1): read offers, answer one, never fail.

The server answers the first offer it can honour, always with ``server_no_context_takeover``
(RFC 7692 §7.1.1.1: a server "MAY include" it whatever the offer said): each message we send is then
compressed on its own, so one compressed frame serves every subscriber with the same window size.
An offer we cannot honour or cannot read is declined, never answered with an error: the handshake
goes on without compression (RFC 7692 §5: "the server MUST NOT accept" an offer it does not
support; declining is always allowed).

The client side reads the server's answer strictly: a malformed answer fails the connection
(RFC 7692 §5: the client "MUST _Fail the WebSocket Connection_").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EXTENSION_NAME",
    "DeflateParams",
    "client_offer",
    "negotiate",
    "parse_extensions",
    "read_response",
]

EXTENSION_NAME = "permessage-deflate"

#: zlib cannot compress with a 256-byte window: asked for 8 window bits, its deflate makes
#: 512-byte-window streams (zlib manual, deflateInit2). An offer that demands 8 of us is declined.
_MIN_OUR_WINDOW = 9
_NO_VALUE = ("server_no_context_takeover", "client_no_context_takeover")
_WINDOWS = ("server_max_window_bits", "client_max_window_bits")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeflateParams:
    """What one connection agreed, from the server's point of view."""

    #: Window bits of what the server sends (9-15); the server never keeps context.
    server_window: int = 15
    #: Window bits the client compresses with, at most (8-15).
    client_window: int = 15
    #: The client starts every message afresh, so the server keeps no inflater between them.
    client_no_context_takeover: bool = False
    #: The server starts every message afresh (always so with our server).
    server_no_context_takeover: bool = True

    @property
    def inflate_window(self) -> int:
        """Window bits to inflate the client's messages with: zlib's deflate, asked for 8,
        makes 9-bit streams, and a larger window inflates any smaller one's stream."""
        return max(self.client_window, _MIN_OUR_WINDOW)


def _split_outside_quotes(text: str, separator: str) -> list[str] | None:
    """``text`` split at ``separator`` outside quoted strings; None when a quote is left open."""
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        return None
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str | None:
    """A parameter value: a token, or a quoted string (RFC 6455 §9.1); None when malformed."""
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        out: list[str] = []
        escaped = False
        for char in inner:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                return None
            else:
                out.append(char)
        return None if escaped else "".join(out)
    if not value or any(c in value for c in ' \t"'):
        return None
    return value


Offer = tuple[str, tuple[tuple[str, str | None], ...]]


def parse_extensions(values: list[str]) -> list[Offer | None]:
    """Every extension element in the ``Sec-WebSocket-Extensions`` header values, in order:
    (lower-cased name, ((parameter, value or None), ...)), or None for an unreadable element."""
    elements: list[Offer | None] = []
    for value in values:
        parts = _split_outside_quotes(value, ",")
        if parts is None:
            elements.append(None)
            continue
        for part in parts:
            if not part.strip():
                continue  # RFC 9110 §5.6.1: empty list elements are ignored
            pieces = _split_outside_quotes(part, ";")
            assert pieces is not None  # quotes balance within a balanced element
            name = pieces[0].strip().lower()
            params: list[tuple[str, str | None]] = []
            readable = bool(name) and _unquote(name) == name
            for piece in pieces[1:]:
                key, equals, raw = piece.partition("=")
                key = key.strip().lower()
                if not key or _unquote(key) != key:
                    readable = False
                    break
                if not equals:
                    params.append((key, None))
                    continue
                unquoted = _unquote(raw)
                if unquoted is None:
                    readable = False
                    break
                params.append((key, unquoted))
            elements.append((name, tuple(params)) if readable else None)
    return elements


def _window_bits(value: str | None) -> int | None:
    """RFC 7692 §7.1.2: a decimal integer 8-15 with no leading zero; None when it is not."""
    if value is None or not value.isascii() or not value.isdigit() or value.startswith("0"):
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def _params_of(params: tuple[tuple[str, str | None], ...]) -> dict[str, str | None] | None:
    """The parameters as a dict; None when one is unknown, repeated or has the wrong form."""
    seen: dict[str, str | None] = {}
    for key, value in params:
        if key in seen:
            return None  # RFC 7692 §7.1: a parameter may appear once
        if key in _NO_VALUE:
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if _window_bits(value) is None:
                return None
        elif key == "client_max_window_bits":
            if value is not None and _window_bits(value) is None:
                return None
        else:
            return None  # RFC 7692 §7.1: an unknown parameter makes the offer invalid
        seen[key] = value
    return seen


def negotiate(values: list[str]) -> tuple[DeflateParams, str] | None:
    """The first permessage-deflate offer in ``values`` (the request's extension headers) that
    we can honour: the agreed parameters and the ``Sec-WebSocket-Extensions`` answer. None when
    nothing was offered or nothing offered can be honoured."""
    for element in parse_extensions(values):
        if element is None or element[0] != EXTENSION_NAME:
            continue
        params = _params_of(element[1])
        if params is None:
            continue
        answer = [EXTENSION_NAME, "server_no_context_takeover"]
        server_window = 15
        if "server_max_window_bits" in params:
            bits = _window_bits(params["server_max_window_bits"])
            assert bits is not None
            if bits < _MIN_OUR_WINDOW:
                continue  # zlib cannot keep within 256 bytes: decline this offer
            server_window = bits
            answer.append(f"server_max_window_bits={bits}")
        client_window = 15
        offered_client_window = params.get("client_max_window_bits")
        if offered_client_window is not None:
            # The client named its own limit: agreeing to it costs an inflater less memory.
            client_window = _window_bits(offered_client_window) or 15
            answer.append(f"client_max_window_bits={client_window}")
        no_takeover = "client_no_context_takeover" in params
        if no_takeover:
            answer.append("client_no_context_takeover")
        agreed = DeflateParams(
            server_window=server_window,
            client_window=client_window,
            client_no_context_takeover=no_takeover,
        )
        return agreed, "; ".join(answer)
    return None


def client_offer() -> str:
    """The client's offer, after the extension name: like the browsers', it lets the server
    pick its window and may be told to start each message afresh."""
    return "client_max_window_bits"


def read_response(value: str) -> DeflateParams | None:
    """The server's answer to ``client_offer`` (the element after the name included); None when
    it is malformed or names what we did not offer, which fails the connection."""
    elements = parse_extensions([value])
    if len(elements) != 1 or elements[0] is None or elements[0][0] != EXTENSION_NAME:
        return None
    params = _params_of(elements[0][1])
    if params is None:
        return None
    server_window = 15
    if "server_max_window_bits" in params:
        bits = _window_bits(params["server_max_window_bits"])
        assert bits is not None
        server_window = bits
    client_window = 15
    if "client_max_window_bits" in params:
        bits = _window_bits(params["client_max_window_bits"])
        if bits is None:
            return None  # RFC 7692 §7.1.2.2: in a response it must carry a value
        client_window = bits
    return DeflateParams(
        server_window=server_window,
        client_window=client_window,
        client_no_context_takeover="client_no_context_takeover" in params,
        server_no_context_takeover="server_no_context_takeover" in params,
    )
