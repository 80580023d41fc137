"""One module per `dsv3` subcommand; see dsv3/cli.py."""
