"""The one place that decides which close codes may go on the wire (RFC 6455 §7.4).

RFC 6455 §7.4.1: 1005, 1006 and 1015 "MUST NOT be set as a status code in a Close control frame by an
endpoint". 1004 is reserved, 1016-2999 are for future protocol revisions, 3000-4999 are for
libraries and applications. wsproto silently rewrites local-only codes as 1000 (wsproto #182); we
refuse them instead. The reference's error-event codes (PROTOCOL.md) are never close codes.
"""

from __future__ import annotations

from ..errors import LocalProtocolError

__all__ = [
    "GOING_AWAY",
    "INTERNAL_ERROR",
    "INVALID_PAYLOAD",
    "MESSAGE_TOO_BIG",
    "NORMAL",
    "NO_STATUS",
    "ABNORMAL",
    "POLICY_VIOLATION",
    "TRY_AGAIN_LATER",
    "PROTOCOL_ERROR",
    "is_sendable_close_code",
    "validate_close_code",
]

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
NO_STATUS = 1005
ABNORMAL = 1006
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
#: RFC 6455 §7.4.1 (IANA registry): the server is short of something; come back later.
TRY_AGAIN_LATER = 1013

_SENDABLE_PROTOCOL_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def is_sendable_close_code(code: int) -> bool:
    """True when ``code`` may appear in a Close frame we send."""
    return code in _SENDABLE_PROTOCOL_CODES or 3000 <= code <= 4999


def validate_close_code(code: int) -> None:
    """Raise ``LocalProtocolError`` unless ``code`` may be sent in a Close frame."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise LocalProtocolError(f"a close code must be an int, got {type(code).__name__}")
    if not is_sendable_close_code(code):
        raise LocalProtocolError(
            f"close code {code} cannot be sent (RFC 6455 §7.4): use 1000-1003, 1007-1014 "
            "or an application code 3000-4999"
        )
