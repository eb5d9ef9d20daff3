from .component import dataset_initializer  # noqa: F401
