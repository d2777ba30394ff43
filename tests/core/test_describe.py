"""``tank_core.describe`` and the purity of the modules the adapters share."""

from __future__ import annotations

import subprocess
import sys

from tank_core.describe import callable_name, describe_error


def test_an_error_is_its_type_then_its_message() -> None:
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == (
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    assert describe_error(TimeoutError()) == "TimeoutError"


def test_a_callable_is_named_by_its_qualified_name_else_its_repr() -> None:
    class Handler:
        def method(self) -> None: ...

        def __call__(self) -> None: ...

        def __repr__(self) -> str:
            return "<handler>"

    assert callable_name(test_a_callable_is_named_by_its_qualified_name_else_its_repr).startswith("test_a_")
    assert callable_name(Handler().method).endswith("Handler.method")
    assert callable_name(Handler()) == "<handler>"


SHARED = (
    "tank_core.client.dispatch, tank_core.client.streams, tank_core.describe, tank_core.server.hooks, "
    "tank_core.server.session"
)
#: Modules that do I/O. (``logging`` is allowed: the session rules write the log lines, and
#: ``logging`` only takes locks from ``threading``, it starts no thread.)
IMPURE = {"asyncio", "trio", "socket", "selectors", "ssl"}


def test_the_shared_modules_pull_in_no_io() -> None:
    check = f"import sys, {SHARED}; print(sorted(set(sys.modules) & {IMPURE!r}))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
