"""The ``tierflow`` command: ``run`` (main.py), ``plan`` and ``probe`` (plan.py), and the report (report.py)."""

from __future__ import annotations

from tierflow.cli.main import main

__all__ = ["main"]
