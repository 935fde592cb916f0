"""``python -m fusedloss.bench``: the same as the ``fusedloss-bench`` command."""

from fusedloss.bench.cli import main

raise SystemExit(main())
