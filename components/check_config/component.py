"""check-config: the first task; checks every parameter on CPU and hands on one config.

Its inputs are the pipeline's parameters, so its signature is built from the parameter table
(``kfp_finetune.config.parameters``) rather than written out a second time: the source below
is generated, registered with ``linecache`` (KFP ships a component's source, read with
``inspect.getsource``) and compiled like any other lightweight component. On a cluster it also
hands the fine-tune task's resources and CreatePVC's name and annotations on as validated
strings (the KFP backend reads resource placeholders as strings; see
kfp_finetune.steps.check_config).
"""

import hashlib
import linecache
from collections.abc import Sequence
from typing import NamedTuple, Optional

from kfp import dsl

from kfp_finetune.config.images import CPU_IMAGE
from kfp_finetune.config.parameters import Param

OUTPUTS = ("config", "accelerator_type", "accelerator_limit", "cpu_request", "memory_request",
           "pvc_name", "pvc_annotations", "bench_accelerator_type", "bench_accelerator_limit",
           "bench_cpu_request", "bench_memory_request")
FIXED_INPUTS = ("runtime", "cluster", "workspace_path", "run_id", "run_name", "pipeline")

_TEMPLATE = '''def check_config(
    runtime: str,
{params}
    cluster: bool = False,
    workspace_path: str = "",
    run_id: str = "",
    run_name: str = "",
    pipeline: str = "",
) -> NamedTuple("RunSettings", [
    ("config", dict), ("accelerator_type", str), ("accelerator_limit", str),
    ("cpu_request", str), ("memory_request", str), ("pvc_name", str),
    ("pvc_annotations", dict), ("bench_accelerator_type", str),
    ("bench_accelerator_limit", str), ("bench_cpu_request", str),
    ("bench_memory_request", str),
]):
    """Check every parameter on CPU, before any volume, download or GPU is asked for.

    Args:
        runtime: The runtime this pipeline was compiled for.
{docs}
        cluster: Whether the operations parameters are checked too (a cluster run).
        workspace_path: Where a local run's workspace is ("" on a cluster: no volume yet).
        run_id: The run's UUID (names the volume).
        run_name: The run's display name (annotated on the volume).
        pipeline: The pipeline's name (annotated on the volume).

    Returns:
        config: the validated run config (kfp_finetune.config.run_config.RunConfig.to_dict);
        accelerator type and limit ("" and "" on CPU), CPU and memory requests, the volume's
        name and annotations of the fine-tune task, and the optional lm-eval task's
        resources (empty for a local run).
    """
    values = {{k: v for k, v in locals().items() if k not in {fixed!r}}}
    from kfp_finetune.steps.step_errors import step_errors

    with step_errors("check-config", workspace_path or None):
        from kfp_finetune.steps.check_run import check_config_task

        config, s = check_config_task(runtime, values, cluster=cluster, run_id=run_id,
                                      run_name=run_name, pipeline=pipeline)
        if s is None:
            print(f"[check-config] {{runtime}}: config checked")
            return (config, "", "", "", "", "", {{}}, "", "", "", "")
        limit = f"{{s.accelerator_limit}} x {{s.accelerator_type}}" if s.accelerator_limit \\
            else "none"
        print(f"[check-config] fine-tune: accelerators {{limit}}, cpu {{s.cpu_request}}, "
              f"memory {{s.memory_request}}; workspace volume {{s.pvc_name}}")
        return (config, s.accelerator_type, s.accelerator_limit, s.cpu_request,
                s.memory_request, s.pvc_name, s.pvc_annotations, s.bench_accelerator_type,
                s.bench_accelerator_limit, s.bench_cpu_request, s.bench_memory_request)
'''


def _source(params: Sequence[Param]) -> str:
    lines = [f"    {p.name}: Optional[{p.type.__name__}] = None," for p in params]
    docs = []
    for p in params:
        words = f"{p.name}: {p.description}".split()
        line, wrapped = "       ", []
        for word in words:
            if len(line) + len(word) + 1 > 96:
                wrapped.append(line)
                line = "           "
            line += " " + word
        docs.extend([*wrapped, line])
    return _TEMPLATE.format(params="\n".join(lines), docs="\n".join(docs),
                            fixed=FIXED_INPUTS)


def build_check_config(params: Sequence[Param]) -> dsl.base_component.BaseComponent:
    """The check-config component for these parameters (every one optional: absent is unset).

    Args:
        params: The parameters the pipeline passes on (all of the table on a cluster; the
            given ones for a local run, since kfp.local needs a value for every input).
    """
    source = _source(params)
    # Named by content: building the same component again reuses its linecache entry.
    filename = f"<kfp-finetune check_config {hashlib.sha256(source.encode()).hexdigest()[:16]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"NamedTuple": NamedTuple, "Optional": Optional}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(
        namespace["check_config"])
