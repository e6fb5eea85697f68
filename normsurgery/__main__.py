"""`python -m normsurgery` runs the CLI."""

from normsurgery.cli import main

main()
