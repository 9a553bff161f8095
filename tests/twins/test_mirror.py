"""The twins mirror each other: same module files, public classes and functions, call
signatures with the same defaults, the same attributes assigned in the same order, one factory
building (and initialising) every projection, and parameter names (the torch state-dict key maps
onto the Flax path by the `weights.names` table and nothing else), and each twin's parameters
are exactly the ones `weights.names.hf_shapes` says a config implies."""

import ast
import re
from pathlib import Path

import pytest

import flax_impl
import torch_impl
from parity import strategies as tst
from parity.inputs import HEADS
from parity.loading import twins_from_config
from tests.helpers.configs import REPO_ROOT
from weights.config import ModelConfig
from weights.names import flax_path, hf_name, hf_shapes, is_transposed

# Framework idiom the mirror allows: torch's `forward` is Flax's `__call__`.
CALL = {"forward": "__call__"}
# Parameters (and the attributes holding them) that one twin has for a framework reason; every
# other parameter, `dtype` / `param_dtype` / `device` / `dispatch` included, is in both twins.
FRAMEWORK_PARAMS = {
    "rngs": "NNX modules draw their initial values from explicit RNG streams; torch from its global generator",
    "precision": "XLA takes a matmul precision per dot; torch's is process-wide (layers/precision.py: "
                 "matmul_precision sets it for a block)",
}
# Attributes one framework keeps for the other's built-in state.
FRAMEWORK_ATTRIBUTES = {
    "deterministic": "train/eval: a torch module carries `training` (set by train()/eval()); an NNX module "
                     "holds a `deterministic` attribute that its train()/eval() set",
    "scan_layers": "XLA compiles every unrolled layer of a jitted program (seconds per layer at 1B scale); the Flax "
                   "twin may scan one compiled layer over stacked parameters. Eager torch compiles nothing",
    "config_key": "torch.compile (torch <= 2.11) cannot take a frozen dataclass (the config) as a constant "
                  "argument of the rotary tables it folds into the graph; the torch twin passes a number for it. "
                  "jax.jit never traces the numpy tables",
}
# Methods whose state is each framework's own object.
OWN_STATE = {
    "serving.py": "each Runner holds its framework's state: torch's device and a cache updated in place, the "
                  "Flax split model (graphdef, state), its compiled step and an immutable cache replaced per step "
                  "(the statements themselves are held to explain's allowances)",
    "layers/attention.py:KVCache.advance": "torch's cache is a mutable object advanced in place; the Flax cache is "
                                           "an immutable pytree, advanced by replace()",
    "training.py:Optimizer.__init__": "torch's Optimizer wraps torch.optim.AdamW, its scheduler and step count; "
                                      "nnx.Optimizer (the Flax twin's base class) holds the optax state itself",
}
# Parameters of functions that only torch has, each for a framework reason.
TORCH_ONLY_ARGS = {
    # torch's tensors are created on an explicit device, JAX's on the default device or wherever
    # jit places them.
    ("model.py", "make_attention_mask"): {"device"},
    # torch runs its decode loop eagerly unless told to compile the step (torch.compile, CUDA
    # graphs); the Flax twin's loop is always one jitted program.
    ("generation.py", "generate"): {"compile"},
    ("generation.py", "generate_records"): {"compile"},
    ("generation.py", "decode"): {"compile"},
}
# Public helpers that exist on one side only, each for a framework difference.
ONE_SIDED = {
    "checkpoint.py": {"tensor_to_numpy", "numpy_to_tensor"},  # torch has no bfloat16 <-> numpy bridge
    # torch's optimizer applies the gradients in `.grad` and needs them zeroed before accumulating;
    # `nnx.Optimizer` (the Flax twin's base class) has its own `update(model, grads)`.
    "training.py": {"Optimizer.update", "Optimizer.zero_grad"},
    "layers/precision.py": {"dot_precision"},  # only XLA takes a precision per dot
    # torch keeps a layer's packs on the module and takes them in any call outside autograd; NNX
    # keeps them beside the module (its state stays its parameters), and a jitted program reads
    # only the packs its caller checked against the kernels and passed in.
    "layers/linear.py": {"Linear.packed", "linear_layers", "linear_packs", "reading_packed_linears"},
    # FSDP2 gathers parameters in module hooks that generate()'s calls bypass: torch gathers them
    # for the whole generation; a sharded JAX array is one global array that jit reads as it is.
    "sharding.py": {"gathered_for_generation"},
    # XLA compiles every unrolled layer of a jitted program: the Flax twin may scan one layer over
    # stacked parameters (DecoderModel.scan_layers); eager torch has nothing to compile.
    # Its stack of the layers' parameters is built once per jitted program (generate()'s prefill
    # and decode loop, the serving runner's programs) and read by every scanned forward in it.
    "model.py": {"same_structure", "scan_decoder_layers", "stack_layers", "reading_layer_stack"},
}
# Writing one framework's dtype or module name in the other's spelling.
_FRAMEWORK_PREFIX = re.compile(r"\b(torch|jnp|jax\.numpy|nn|nnx)\.")


def module_files(pkg: str) -> set[str]:
    return {str(p.relative_to(REPO_ROOT / pkg)) for p in (REPO_ROOT / pkg).rglob("*.py")}


def public_defs(path: Path) -> dict[str, ast.AST]:
    """Top-level public classes/functions and the public methods of classes, by qualified name."""
    out: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            out[node.name] = node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name in ("__init__", "__call__")):
                        out[f"{node.name}.{CALL.get(item.name, item.name)}"] = item
    return out


def arg_names(fn: ast.FunctionDef, skip: set[str] = frozenset()) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in FRAMEWORK_PARAMS.keys() | skip]


def arg_defaults(fn: ast.FunctionDef, skip: set[str] = frozenset()) -> dict[str, str]:
    """Parameter -> its default, framework prefixes dropped (`torch.float32` == `jnp.float32`)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
    pairs += [(x, d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    return {x.arg: _FRAMEWORK_PREFIX.sub("", ast.unparse(d)) for x, d in pairs if x.arg not in FRAMEWORK_PARAMS.keys() | skip}


def self_assignments(fn: ast.FunctionDef) -> list[str]:
    """The attributes a method assigns on `self`, in source order (a module's structure)."""
    names = []
    for node in ast.walk(fn):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for el in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                    names.append((el.lineno, el.col_offset, el.attr))
    return [n for _, _, n in sorted(names) if n not in FRAMEWORK_PARAMS and n not in FRAMEWORK_ATTRIBUTES]


def test_same_module_files():
    assert module_files("torch_impl") == module_files("flax_impl")


@pytest.mark.parametrize("rel", sorted(module_files("torch_impl")))
def test_same_public_names_and_signatures(rel):
    t_defs, f_defs = public_defs(REPO_ROOT / "torch_impl" / rel), public_defs(REPO_ROOT / "flax_impl" / rel)
    allowed = ONE_SIDED.get(rel, set())
    # A dataclass-generated __init__ (Flax pytrees) has no source to compare.
    t_names = {n for n in t_defs if n not in allowed and not n.endswith(".__init__")}
    f_names = {n for n in f_defs if n not in allowed and not n.endswith(".__init__")}
    assert sorted(t_names) == sorted(f_names), f"{rel}: public names differ"
    for name, node in t_defs.items():
        if isinstance(node, ast.FunctionDef) and name in f_defs:
            skip = TORCH_ONLY_ARGS.get((rel, name), set())
            assert arg_names(node, skip) == arg_names(f_defs[name]), f"{rel}:{name}: signatures differ"
            assert arg_defaults(node, skip) == arg_defaults(f_defs[name]), f"{rel}:{name}: defaults differ"


@pytest.mark.parametrize("rel", sorted(module_files("torch_impl")))
def test_same_attributes_in_the_same_order(rel):
    """Each mirrored method assigns the same `self.` attributes in the same order, so the two
    constructors (and the code between them) line up statement by statement."""
    t_defs, f_defs = public_defs(REPO_ROOT / "torch_impl" / rel), public_defs(REPO_ROOT / "flax_impl" / rel)
    for name, node in t_defs.items():
        if isinstance(node, ast.FunctionDef) and isinstance(f_defs.get(name), ast.FunctionDef):
            if f"{rel}:{name}" not in OWN_STATE and str(rel) not in OWN_STATE:
                assert self_assignments(node) == self_assignments(f_defs[name]), f"{rel}:{name}: attributes differ"


@pytest.mark.parametrize("twin", ["torch_impl", "flax_impl"])
def test_every_projection_comes_from_the_one_factory(twin):
    """Parameter init in one place: outside `layers/linear.py` no file of the LLaMA-family twin
    builds a framework dense layer itself (the Transformer-VQ twin keeps its reference's init)."""
    for path in sorted((REPO_ROOT / twin).rglob("*.py")):
        rel = path.relative_to(REPO_ROOT / twin)
        if rel.parts[0] == "vq" or str(rel) == "layers/linear.py":
            continue
        source = path.read_text()
        assert not re.search(r"\b(nn|nnx)\.Linear\(", source), f"{twin}/{rel} builds a Linear outside the factory"
        assert "init_weights" not in source and "nn.init." not in source, f"{twin}/{rel} re-initialises parameters"


def test_same_exports():
    assert sorted(torch_impl.__all__) == sorted(flax_impl.__all__)


CONFIGS = [
    ModelConfig(vocab_size=17, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, attention_bias=True, mlp_bias=True, pad_token_id=0),
    ModelConfig(vocab_size=17, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                tie_word_embeddings=True, num_labels=3),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("head", sorted(HEADS))
def test_parameter_names_map_by_the_table(config, head):
    from flax import nnx

    t_model, f_model = twins_from_config(config, head).pair
    t_names = set(t_model.state_dict())
    f_paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(f_model, nnx.Param))}
    assert {flax_path(n) for n in t_names} == f_paths
    assert {hf_name(p) for p in f_paths} == t_names
    if config.tie_word_embeddings and head == "causal_lm":
        assert "lm_head.weight" not in t_names  # tied: stored once, as HF saves it


TABLE_CONFIGS = {**tst.family_examples(), "biases": CONFIGS[0], "tied": CONFIGS[1]}


@pytest.mark.parametrize("name", sorted(TABLE_CONFIGS))
def test_each_twin_has_exactly_the_parameters_of_the_table(name):
    """`weights.names.hf_shapes` is the one table of every parameter a config implies: each twin's
    parameters (names and HF shapes) equal it, for every family and head. Built without
    allocating (torch on the meta device, Flax under `nnx.eval_shape`)."""
    import torch
    from flax import nnx

    config = TABLE_CONFIGS[name]
    for head, cls in [*HEADS.items(), ("decoder", "DecoderModel")]:
        want = hf_shapes(config, head)
        with torch.device("meta"):
            t_model = getattr(torch_impl, cls)(config)
        assert {k: tuple(v.shape) for k, v in t_model.state_dict().items()} == want, (name, head)
        f_model = nnx.eval_shape(lambda: getattr(flax_impl, cls)(config, rngs=nnx.Rngs(0)))
        f_shapes = {}
        for path, var in nnx.to_flat_state(nnx.state(f_model, nnx.Param)):
            key, shape = hf_name(path), tuple(var.get_value().shape)
            f_shapes[key] = shape[::-1] if is_transposed(key) else shape
        assert f_shapes == want, (name, head)
