"""``python -m loraport``: the same as the ``loraport`` command (cli.main)."""

from .cli import main

raise SystemExit(main())
