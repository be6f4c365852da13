"""Pure tensor math and small torch helpers: the bottom layer (imports torch and adamerge.errors only)."""
