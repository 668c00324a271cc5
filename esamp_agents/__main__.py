"""`python -m esamp_agents` runs the command line (see esamp_agents.cli)."""

from esamp_agents.cli import main

raise SystemExit(main())
