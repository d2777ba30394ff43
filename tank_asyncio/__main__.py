"""``python -m tank_asyncio serve ...``: the same command line as the ``tank`` console script."""

from ._cli import main

raise SystemExit(main())
