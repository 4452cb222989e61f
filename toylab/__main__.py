"""`python -m toylab ...` runs the command line, like the `toylab` script."""

from toylab.cli import app

app()
