"""`python -m proxy` is the `graygate` command."""

from proxy.cli import main

raise SystemExit(main())
