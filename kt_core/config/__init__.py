"""Configuration: Hydra groups under ``conf/`` typed by the dataclasses in ``schema``."""
from kt_core.config.compose import compose, config_dir, explain, to_yaml, user_config_dir
from kt_core.config.schema import KtConfig

__all__ = ["KtConfig", "compose", "config_dir", "explain", "to_yaml", "user_config_dir"]
