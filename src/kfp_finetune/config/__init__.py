"""User configuration: the Kubeflow SDK's types, our extension of them, runtimes, parameters."""
