from .pipeline import build_pipeline, pipeline_name  # noqa: F401
