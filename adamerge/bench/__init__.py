"""The offline real benchmark: packaged text datasets, a MiniLM model zoo, and the results table."""
