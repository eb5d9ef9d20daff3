"""The pipeline's steps as plain Python, each beside the planning and checking code it owns.

Steps never import ``kfp_finetune.components``, ``kfp_finetune.pipelines`` or the drivers.
"""
