"""Subcommands of the `unmask` command line, one module each (see unmask.cli)."""
