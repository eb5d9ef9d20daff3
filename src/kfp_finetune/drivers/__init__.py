"""How a run is started: the Python API, the CLI, kfp.local, submit, compile, the client."""
