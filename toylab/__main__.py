"""`python -m toylab ...` runs the command line, like the `toylab` script."""

from cli import app

app()
