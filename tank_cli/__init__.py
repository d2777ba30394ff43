"""The ``tank`` command line: ``tank serve`` runs a server, ``tank sub`` and ``tank pub`` are clients.

``tank serve`` takes each option as a flag or as a ``TANK_<OPTION>`` environment variable (the flag
wins) and runs ``tank_asyncio.serve`` or ``tank_trio.serve`` until SIGINT, SIGTERM or SIGHUP,
logging as text or JSON (``_serve.py``, ``_logs.py``). ``tank sub`` prints the messages of its
topics through ``tank_asyncio.connect``, saying on stderr what it is doing; ``tank pub`` publishes
through the HTTP API (``-``: standard input). ``tank --version`` prints the installed version. A bad
option or value is one line on stderr and exit status 2.

The ``tank`` console script and ``python -m tank_cli`` both call ``main``.
"""

from ._main import main

__all__ = ["main"]
