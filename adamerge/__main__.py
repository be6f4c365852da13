"""``python -m adamerge``: the ``adamerge`` command (``adamerge sweep`` runs each candidate this way)."""

from adamerge.cli import main

main()
