"""``python -m adamerge``: the ``adamerge`` command (``adamerge sweep`` runs each candidate this way)."""

from adamerge.cli.main import main

main()
