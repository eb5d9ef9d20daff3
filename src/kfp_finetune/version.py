"""The package version, in a module of its own so that any layer can read it.

``kfp_finetune/__init__.py`` imports the drivers; a step or storage module that imported the
version from there would import every layer (an import cycle).
"""

__version__ = "0.1.0"
