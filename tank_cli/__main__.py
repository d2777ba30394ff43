"""``python -m tank_cli ...``: the same command line as the ``tank`` console script."""

from ._main import main

raise SystemExit(main())
