from .component import check_config  # noqa: F401
