"""``python -m stabilitylab`` runs the command-line interface."""

from stabilitylab.cli import main

raise SystemExit(main())
