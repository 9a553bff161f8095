"""The Transformer-VQ checkpoint format, beside the LLaMA family's (mirrors `torch_impl/vq/` and
`flax_impl/vq/`): `config` (`TransformerVQConfig`, read from and written to `config.json`) and
`checkpoint` (the name/shape table, safetensors save/load, the importer of the reference's
parameter tree). numpy + safetensors + ml_dtypes only, like the rest of `weights/`.
"""

from .config import VQ_DTYPES, VQ_MODEL_TYPE, TransformerVQConfig

__all__ = ["TransformerVQConfig", "VQ_DTYPES", "VQ_MODEL_TYPE"]
