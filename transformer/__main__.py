"""``python -m transformer``: the same command as the ``transformer`` console script."""

from transformer.cli import main

raise SystemExit(main())
