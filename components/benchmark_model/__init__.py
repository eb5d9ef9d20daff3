from .component import benchmark_model  # noqa: F401
