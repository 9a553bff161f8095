"""The `config.json` spelling layer of `ModelConfig`: reading and writing Hugging Face's file.

Both spellings of transformers 4.x and 5.x are read (`torch_dtype`/`dtype`,
`rope_scaling`/`rope_parameters`, `type`/`rope_type`, `rope_theta` inside `rope_parameters`) and
written back in the spelling the source used. Keys that the config does not model are kept
verbatim in `extra` and written back unchanged, so `from_hf_dict(d).to_hf_dict()` keeps every key
and value of `d`. A key absent from `config.json` takes the default of its family's HF config
class (`weights.families.FAMILIES`).

This module knows spellings, not rules: what a valid config is lives with the dataclass
(`weights.config.ModelConfig.validate`), which calls in here; nothing here imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError
from .families import FAMILIES

__all__ = ["CONFIG_NAME", "SPELLINGS", "freeze", "thaw", "spelling", "rope_fields_from_hf", "rope_to_hf",
           "fields_from_hf_dict", "to_hf_dict", "read_config_json", "read_config_bytes", "parse_config_json", "write_config_json",
           "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH"]

CONFIG_NAME = "config.json"

# ModelConfig field -> its HF spellings, the canonical (written when the source had none) first.
SPELLINGS = {"torch_dtype": ("torch_dtype", "dtype"), "rope_scaling": ("rope_scaling", "rope_parameters")}
_ALIASES = {key: name for name, keys in SPELLINGS.items() for key in keys}

# Fields written to config.json always; the family/switch fields after them are written only
# when the source had them or they differ from the family's value (a Llama config.json gets no
# Gemma switches).
_CORE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "num_labels", "problem_type",
                "model_type", "architectures", "torch_dtype")

# The RopeScaling fields HF writes as keys of `rope_scaling` (the type key aside).
_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def freeze(value: Any) -> Any:
    """JSON-like value -> hashable (dicts become sorted tuples of pairs, lists tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of `freeze` for values written to JSON (pairs-tuples become dicts)."""
    if isinstance(value, tuple):
        if value and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
            return {k: thaw(v) for k, v in value}
        return [thaw(v) for v in value]
    return value


def spelling(source_keys: Iterable[str], name: str) -> str:
    """The key field `name` had in the source config.json (`source_keys`), or its canonical HF key."""
    spellings = SPELLINGS.get(name, (name,))
    return next((k for k in source_keys if k in spellings), spellings[0])


def rope_fields_from_hf(d: Mapping[str, Any] | None, key: str, source: str | None) -> dict[str, Any] | None:
    """The `RopeScaling` fields of an HF `rope_scaling` / `rope_parameters` object (found under
    `key`), or None when it is null."""
    if d is None:
        return None
    if not isinstance(d, Mapping):
        raise ConfigError(key, f"must be an object or null, got {type(d).__name__}", source=source)
    d = dict(d)
    if any(isinstance(v, Mapping) for v in d.values()):
        raise ConfigError(key, "per-layer-type rotary parameters (one object per attention kind) "
                          "are not supported", source=source)
    # transformers 4.x wrote "type", later versions "rope_type" (some files carry both: the
    # other one then stays in `extra`); 5.x keeps rope_theta in here too (ModelConfig.rope_theta).
    type_key = "rope_type" if "rope_type" in d else "type" if "type" in d else "rope_type"
    rope_type = d.pop(type_key, None) or "default"
    d.pop("rope_theta", None)
    known = {k: d.pop(k) for k in _ROPE_KEYS if k in d}
    return dict(rope_type=rope_type, extra=freeze(d), type_key=type_key, **known)


def rope_to_hf(rope: Any) -> dict[str, Any]:
    """The HF `rope_scaling` object of a `RopeScaling`, in the spelling it was read with."""
    d: dict[str, Any] = {rope.type_key: rope.rope_type}
    for name in _ROPE_KEYS:
        v = getattr(rope, name)
        if v is not None:
            d[name] = v
    d.update(thaw(rope.extra) if rope.extra else {})
    return d


def fields_from_hf_dict(d: Mapping[str, Any], field_names: set[str], source: str | None) -> dict[str, Any]:
    """`ModelConfig` keyword arguments from a parsed HF `config.json`: the family's values first,
    then the file's keys under their field names; unmodelled keys go to `extra` and the file's
    keys to `source_keys`. `rope_scaling` is left as `rope_fields_from_hf`'s dict (or None)."""
    if not isinstance(d, Mapping):
        raise ConfigError("<root>", f"config must be a JSON object, got {type(d).__name__}", source=source)
    model_type = d.get("model_type", "llama")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        shown = repr(model_type) if len(repr(model_type)) <= 60 else repr(model_type)[:57] + "..."
        raise ConfigError("model_type", f"unsupported model_type {shown}; supported: "
                          f"{', '.join(FAMILIES)}", source=source)
    # The family's values first: keys absent from config.json take that family's HF defaults.
    kwargs: dict[str, Any] = dict(FAMILIES[model_type].values)
    seen: set[str] = set()
    extra: dict[str, Any] = {}
    for key, value in d.items():
        name = _ALIASES.get(key, key)
        if name in field_names and name not in seen:
            kwargs[name] = value
            seen.add(name)
        else:  # unmodelled, or a second spelling of a field already read: kept verbatim
            extra[key] = value
    # 5.x keeps rope_theta inside rope_parameters.
    rp = d.get("rope_parameters")
    if "rope_theta" not in d and isinstance(rp, Mapping) and "rope_theta" in rp:
        kwargs["rope_theta"] = rp["rope_theta"]
    rope_key = next((k for k in d if _ALIASES.get(k) == "rope_scaling"), "rope_scaling")
    kwargs["rope_scaling"] = rope_fields_from_hf(kwargs.get("rope_scaling"), rope_key, source)
    for name in ("bos_token_id", "eos_token_id", "architectures", "layer_types"):
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        v = kwargs.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 1023:  # larger: refused as not finite
            kwargs[name] = float(v)
    if "num_labels" not in kwargs and isinstance(d.get("id2label"), Mapping):
        kwargs["num_labels"] = len(d["id2label"])
    return dict(kwargs, extra=freeze(extra), source_keys=tuple(str(k) for k in d))


def to_hf_dict(config: Any) -> dict[str, Any]:
    """The HF `config.json` mapping of a `ModelConfig`: modelled fields plus the unmodelled keys,
    unchanged. Keys keep the spelling of the config.json it was read from. Core fields are always
    written; family/switch fields when the source had them or they differ from the family."""
    fields = dataclasses.fields(config)
    family = {f.name: f.default for f in fields} | FAMILIES[config.model_type].values
    present = set(config.source_keys)
    rope_key = spelling(present, "rope_scaling")
    # 5.x configs keep rope_theta inside rope_parameters, with no top-level key.
    theta_inside = rope_key == "rope_parameters" and "rope_theta" not in present and config.rope_scaling is not None
    d: dict[str, Any] = {}
    for f in fields:
        if f.name in ("extra", "source_keys") or (f.name == "rope_theta" and theta_inside):
            continue
        key, v = spelling(present, f.name), getattr(config, f.name)
        if f.name not in _CORE_FIELDS and key not in present and v == family[f.name]:
            continue
        if f.name == "rope_scaling":
            v = rope_to_hf(v) if v is not None else None
            if theta_inside:
                v["rope_theta"] = config.rope_theta
        elif isinstance(v, tuple):
            v = list(v)
        d[key] = v
    d.update(config.extra_dict)
    return d


# config.json is read with limits, so a hostile file is refused before it costs anything: real
# ones are a few kB (an id2label map of 20 k classes is ~1 MB) and nest 3 deep.
MAX_CONFIG_BYTES = 16 << 20
MAX_CONFIG_DEPTH = 32


def read_config_json(directory: str | os.PathLike) -> tuple[Any, str]:
    """The parsed `<directory>/config.json` and its path; `ConfigError` when absent, not a regular
    file, larger than `MAX_CONFIG_BYTES`, not JSON, or nested deeper than `MAX_CONFIG_DEPTH`."""
    raw, source = read_config_bytes(directory)
    return parse_config_json(raw, source), source


def read_config_bytes(directory: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes of `<directory>/config.json` and its path, read within the limits of
    `read_config_json` (not parsed)."""
    path = Path(directory) / CONFIG_NAME
    source = str(path)
    try:
        # O_NONBLOCK: a FIFO named config.json must not block the open; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError("<file>", "config.json not found", source=source) from None
    except OSError as e:
        raise ConfigError("<file>", f"cannot open config.json ({e.strerror or e})", source=source) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("<file>", "config.json is not a regular file", source=source)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError("<file>", f"config.json is {st.st_size} bytes, above the {MAX_CONFIG_BYTES}-byte limit",
                              source=source)
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:  # grew while being read
        raise ConfigError("<file>", f"config.json is above the {MAX_CONFIG_BYTES}-byte limit", source=source)
    return raw, source


def parse_config_json(raw: bytes, source: str | None = None) -> Any:
    """Parse config.json bytes with the depth limit; `ConfigError` (never a traceback) otherwise.

    JSON's own errors, integers past Python's digit limit (ValueError) and nesting past the
    interpreter's recursion limit (RecursionError) all become one-line `ConfigError`s; the
    message never quotes the file's bytes.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("<file>", f"not UTF-8 (byte {e.start})", source=source) from None
    except json.JSONDecodeError as e:
        raise ConfigError("<file>", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                          source=source) from None
    except RecursionError:
        raise ConfigError("<file>", f"nested deeper than {MAX_CONFIG_DEPTH} levels", source=source) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError("<file>", f"not valid JSON ({str(e).split(':')[0][:80]})", source=source) from None
    if _depth(data) > MAX_CONFIG_DEPTH:
        raise ConfigError("<file>", f"nested deeper than {MAX_CONFIG_DEPTH} levels", source=source)
    return data


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_CONFIG_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def write_config_json(directory: str | os.PathLike, d: Mapping[str, Any]) -> Path:
    """Write `<directory>/config.json` atomically: a temporary file renamed into place."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
