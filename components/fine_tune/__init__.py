from .component import fine_tune  # noqa: F401
