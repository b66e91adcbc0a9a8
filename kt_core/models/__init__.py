"""Architectures built from HF config.json: one decoder, one MoE block, many routers."""
from kt_core.models.spec import ARCHITECTURES, ModelSpec, parse_config

__all__ = ["ARCHITECTURES", "ModelSpec", "parse_config"]
