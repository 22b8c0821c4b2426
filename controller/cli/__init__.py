"""The command line: `sgctl` and its subcommands."""
