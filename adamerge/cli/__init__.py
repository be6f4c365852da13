"""The ``adamerge`` command: ``main`` dispatches; ``app`` holds the LightningCLI and ``merge``; ``sweep`` trains one fit
per setting."""
