from .component import model_initializer  # noqa: F401
