"""`python -m afinar ...`: the same CLI as the `afinar` command."""

from afinar.cli import app

app(prog_name="afinar")
