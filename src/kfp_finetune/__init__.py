"""kfp-finetune: fine-tune LLMs with torchtune on Kubeflow Pipelines."""
