from .component import serve_model  # noqa: F401
