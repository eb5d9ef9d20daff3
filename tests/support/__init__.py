"""Test support code shared by the unit, integration and reliability layers (not tests).

Imported as ``from support.hub_server import HubServer``: pytest puts ``tests/`` on
``sys.path`` (``pythonpath`` in pyproject.toml).
"""
