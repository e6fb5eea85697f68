"""`python -m normsurgery` runs the CLI."""

from normsurgery.cli import entry

entry()
