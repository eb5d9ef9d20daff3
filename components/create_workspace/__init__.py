from .component import create_workspace  # noqa: F401
