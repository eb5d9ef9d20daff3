from .component import cleanup_workspace  # noqa: F401
