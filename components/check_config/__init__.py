from .component import FIXED_INPUTS, OUTPUTS, build_check_config  # noqa: F401
