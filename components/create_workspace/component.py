"""create-workspace: one new PVC per run, mounted at /workspace by every other task."""

from kfp import kubernetes

# kfp-kubernetes' CreatePVC is a platform-specific component that the KFP backend runs itself
# (no container); re-exported here so the pipeline names all five components in one place.
create_workspace = kubernetes.CreatePVC
