"""``tierflow ARGS`` in-process, for the command-line tests."""

from __future__ import annotations

from tierflow.cli.main import main


def cli(capsys, *args):
    """(exit status, stdout, stderr) of ``tierflow ARGS``."""
    status = main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err
