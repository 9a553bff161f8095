"""The checkpoint format shared by both twins: config, name rules, safetensors IO, converter.

The converter lives in `weights.convert` (`from weights.convert import convert`); it is not
re-exported here, so that `weights.convert` stays the module.

numpy + safetensors + ml_dtypes only: this package imports neither torch nor jax (the one
pickle path of the converter imports torch lazily, when explicitly asked to).
"""

from .checkpoint import (FLAX_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointReader,
                         ShardedWriter, atomic_directory, parse_size, plan_shards)
from .config import ConfigError, ModelConfig, RopeScaling
from .errors import (LOAD_ERRORS, CheckpointError, CheckpointNotFoundError, ConfigMismatchError, DataOffsetError,
                     DestinationExistsError, HeaderError, MemoryLimitError, MissingDependencyError, MissingKeysError,
                     NonFiniteWeightsError, SourceChangedError, UnsafePathError,
                     PickleRefusedError, SafetensorsFormatError, ShapeMismatchError, ShardIndexError,
                     StateMismatchError, TiedWeightsMismatchError, TruncatedFileError,
                     UnexpectedKeysError, UnknownDtypeError)
from .names import HEADS, IGNORE_INDEX, flax_key, flax_path, hf_key_from_flax, hf_name, hf_shapes, is_transposed
from .report import LoadReport, TensorMismatch, iter_tensors, match_state
from .safetensors_io import SafetensorsFile, TensorSpec, load_file
from .safetensors_writer import SafetensorsWriter, save_file
from .vq import TransformerVQConfig

__all__ = [
    "ModelConfig", "RopeScaling", "ConfigError",
    "flax_path", "hf_name", "is_transposed", "flax_key", "hf_key_from_flax", "hf_shapes", "HEADS", "IGNORE_INDEX",
    "SafetensorsFile", "SafetensorsWriter", "TensorSpec", "load_file", "save_file",
    "CheckpointReader", "ShardedWriter", "atomic_directory", "parse_size", "plan_shards",
    "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME", "FLAX_WEIGHTS_NAME",
    "LoadReport", "TensorMismatch", "match_state", "iter_tensors",
    "CheckpointError", "SafetensorsFormatError", "TruncatedFileError", "HeaderError",
    "UnknownDtypeError", "DataOffsetError", "ShardIndexError", "CheckpointNotFoundError",
    "StateMismatchError", "MissingKeysError", "UnexpectedKeysError", "ShapeMismatchError",
    "TiedWeightsMismatchError", "PickleRefusedError", "MissingDependencyError",
    "DestinationExistsError", "LOAD_ERRORS", "ConfigMismatchError", "NonFiniteWeightsError",
    "MemoryLimitError", "UnsafePathError", "SourceChangedError", "TransformerVQConfig",
]
