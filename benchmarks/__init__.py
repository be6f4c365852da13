"""The offline benchmark, outside the wheel: packaged text and image tasks, model zoos, the method grid
(``grid.yaml``) and the results table. Uses adamerge's public API only (``import adamerge``)."""
