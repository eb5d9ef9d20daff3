from .component import tokenize_dataset  # noqa: F401
