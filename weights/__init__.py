"""The checkpoint format shared by both twins: config, name rules, safetensors IO.

numpy + safetensors + ml_dtypes only: this package imports neither torch nor jax.
"""

from .config import ConfigError, ModelConfig, RopeScaling

__all__ = ["ConfigError", "ModelConfig", "RopeScaling"]
