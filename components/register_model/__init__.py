from .component import register_model  # noqa: F401
