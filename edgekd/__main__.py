"""`python -m edgekd ...` (and `torchrun -m edgekd ...`): the same command line as `edgekd`."""

from .cli import main

raise SystemExit(main())
