from .component import export_model  # noqa: F401
