"""The known framework idioms: the honest differences between the two twins, one line each.

Two statements written in the two frameworks often say the same thing in different words:
`x.view(s).transpose(1, 2)` and `x.reshape(s).swapaxes(1, 2)`, `scores.masked_fill(~mask, m)`
and `jnp.where(mask, scores, m)`. The `Normaliser` rewrites a statement's syntax tree into one
canonical form, so such pairs compare equal, and records which idioms it used: the page then
highlights the words that differ and names the idiom. A few differences cannot be rewritten
away (an in-place cache write against `lax.dynamic_update_slice`); `PAIR_IDIOMS` recognises
those pairs of statements as explained.

`IDIOMS` is the table the pages show. Each entry has an id, the torch and the Flax spelling,
one line saying why the frameworks differ there, and whether it is `notable` (tagged on every
row that uses it) or mere spelling (`torch.cat` vs `jnp.concatenate`: highlighted, not tagged).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["IDIOMS", "Idiom", "Normaliser", "PAIR_IDIOMS", "ONE_SIDED_IDIOMS", "normalise"]


@dataclass(frozen=True)
class Idiom:
    """One honest framework difference."""

    id: str
    torch: str
    flax: str
    why: str
    notable: bool = True


IDIOMS: dict[str, Idiom] = {i.id: i for i in [
    Idiom("forward", "def forward(self, ...)", "def __call__(self, ...)",
          "torch calls `Module.forward` through `__call__` (hooks); NNX modules are plain callables"),
    Idiom("super-init", "super().__init__()", "(nothing)",
          "`torch.nn.Module` registers parameters in machinery its `__init__` sets up; NNX needs no base init"),
    Idiom("rngs", "nn.Linear(e, i, bias=b, dtype=...)", "nnx.Linear(e, i, use_bias=b, dtype=..., param_dtype=..., kernel_init=..., rngs=rngs)",
          "NNX builds parameters at construction from an explicit PRNG stream and initializer; torch "
          "allocates, then re-initialises in place (`init_weights`)"),
    Idiom("kernel", "linear.weight  [out, in]", "linear.kernel  [in, out]",
          "torch's `nn.Linear` computes `x @ W.T`; `nnx.Linear` computes `x @ K`: the same matrix, transposed "
          "(the converter's only layout rule)"),
    Idiom("param", "nn.Parameter(t)", "nnx.Param(a)",
          "both wrap an array as a trainable leaf; NNX variables are read with `v[...]`"),
    Idiom("var-read", "self.weight", "self.weight[...]",
          "an NNX `Variable` is a box: `[...]` reads the array inside (`.value` is deprecated)"),
    Idiom("to-astype", "x.to(dtype)", "x.astype(dtype)",
          "the cast: torch's `.to` also moves devices; JAX arrays cast with `astype` (placement is `device_put`)"),
    Idiom("view-reshape", "x.view(shape)", "x.reshape(shape)",
          "torch `view` insists on no copy; JAX arrays are immutable values, so `reshape` is the only spelling"),
    Idiom("transpose-swapaxes", "x.transpose(1, 2)", "x.swapaxes(1, 2)  /  x.transpose(0, 2, 1, 3)",
          "torch's `transpose(a, b)` swaps two axes; numpy's `transpose` takes a full permutation, "
          "`swapaxes(a, b)` is the two-axis form"),
    Idiom("masked-fill", "x.masked_fill(~keep, v)", "jnp.where(keep, x, v)",
          "torch fills where a mask is true (in place or not); JAX selects with `where`: same values"),
    Idiom("unsqueeze", "x.unsqueeze(1)", "x[:, None]",
          "a new length-1 axis; both accept `None` indexing, torch code conventionally says `unsqueeze`"),
    Idiom("no-grad", "with torch.no_grad():", "jax.lax.stop_gradient(x)  (or nothing)",
          "torch records a tape unless told not to; JAX differentiates only what `grad` traces, and "
          "`stop_gradient` cuts one value"),
    Idiom("detach", "x.detach()", "x",
          "a torch tensor carries its autograd history; a JAX array never does"),
    Idiom("device", "torch.zeros(..., device=d)", "jnp.zeros(...)",
          "torch allocates on an explicit device; JAX places arrays by `jax.default_device` / `device_put`"),
    Idiom("precision", "torch.matmul(a, b)  (precision: process-wide switches)", "jnp.matmul(a, b, precision=p)",
          "XLA takes a matmul precision per dot, so the Flax twin passes its module's `precision` to each; "
          "torch's float32 matmul mode is process-wide (layers/precision.py: `matmul_precision`)"),
    Idiom("inplace-write", "buf[:, :, start:end] = x   /   x[i] = v", "lax.dynamic_update_slice(buf, x, index)  /  x.at[i].set(v)",
          "JAX arrays are immutable: an update returns a new array (XLA reuses the buffer under jit); "
          "a traced start index needs `dynamic_update_slice`"),
    Idiom("values-indices", "x.max(-1).values  /  torch.sort(x).indices", "x.max(-1)  /  jnp.argsort(x)",
          "torch reductions and sorts return (values, indices) pairs; numpy has a function for each"),
    Idiom("gather", "x.gather(dim, idx)", "jnp.take_along_axis(x, idx, axis=dim)",
          "the same gather along one axis, in each library's name"),
    Idiom("chunk-split", "x.chunk(2, dim=-1)", "jnp.split(x, 2, axis=-1)",
          "torch's chunk(n) is numpy's split into n equal parts (torch's own split takes sizes)"),
    Idiom("clamp", "x.clamp(min=a, max=b)", "jnp.clip(x, a, b)  /  jnp.maximum(x, a)",
          "torch's clamp is numpy's clip"),
    Idiom("one-hot", "F.one_hot(z, n).to(dtype)", "jax.nn.one_hot(z, n, dtype=dtype)",
          "torch's one_hot returns int64 and is cast after; JAX's takes the dtype"),
    Idiom("tensor-array", "torch.tensor(v, dtype=d)", "jnp.asarray(v, dtype=d)  /  jnp.array(...)",
          "making an array from Python or numpy values"),
    Idiom("dataclass", "@dataclass", "@flax.struct.dataclass",
          "a Flax struct dataclass is a pytree, so outputs and caches pass through `jax.jit`"),
    Idiom("dynamic-slice", "x[:, start:start + n]", "lax.dynamic_slice_in_dim(x, start, n, axis=1)",
          "a slice whose start is traced under jit must be a `dynamic_slice`; torch slices eagerly"),
    Idiom("int-dtype", "torch.int64 (torch.long)", "jnp.int32",
          "index arrays: torch's default integer is int64, JAX's int32 (int64 needs 64-bit mode); "
          "both index the same elements"),
    Idiom("pad", "F.pad(x, (left, right))", "jnp.pad(x, ((0, 0), ..., (left, right)))",
          "torch's pad lists (before, after) pairs from the last axis backwards; numpy's one pair per axis"),
    Idiom("split-sizes", "torch.split(x, [a, b, c])", "jnp.split(x, [a, a + b])",
          "torch splits by section sizes, numpy at cut indices"),
    Idiom("rng", "torch.rand(shape, generator=g)", "jax.random.uniform(key, shape)  /  jax.random.fold_in(key, i)",
          "torch draws from a stateful generator; JAX from explicit keys, split or folded per use"),
    Idiom("autograd", "loss.backward(); optimizer.step()", "grads = nnx.grad(f)(model); optimizer.update(...)",
          "torch accumulates `.grad` on the parameters and steps in place; JAX returns gradients from a "
          "transformed function"),
    Idiom("traced", "int(x)  /  a Python loop", "concrete_int(x)  /  jax.lax.while_loop / scan",
          "under jit JAX values are tracers: Python cannot branch or loop on them, so the Flax twin asks whether a "
          "value is concrete, or writes the loop as a traced `while_loop` / `scan`"),
    Idiom("train-mode", "model.eval()", "(nothing)",
          "torch modules carry a train/eval flag; the twins pass `is_train` / deterministic flags explicitly"),
    Idiom("dtype-object", "dtype == torch.float64", "jnp.dtype(dtype) == jnp.float64",
          "torch dtypes are objects that compare directly; `jnp.float32` is a scalar type, so JAX code makes a "
          "dtype with `jnp.dtype(x)` before comparing or storing it"),
    Idiom("types", "torch.Tensor, torch.dtype", "jax.Array, jnp.dtype",
          "type annotations name each framework's array and dtype types", notable=False),
    Idiom("namespace", "torch.cat / F.silu / torch.rsqrt", "jnp.concatenate / jax.nn.silu / jax.lax.rsqrt",
          "the same function under each library's name", notable=False),
    Idiom("dim-axis", "dim=-1, keepdim=True", "axis=-1, keepdims=True",
          "torch says `dim`/`keepdim`, numpy `axis`/`keepdims`", notable=False),
    Idiom("method-function", "x.pow(2).mean(-1)", "jnp.mean(jnp.square(x), axis=-1)",
          "torch code favours tensor methods, JAX code `jnp` functions; both exist in both", notable=False),
]}


# ---- rewriting one statement into the canonical form ------------------------------------------
_TORCH_NS = {"torch", "F", "torch.nn.functional", "torch.linalg", "torch.special"}
_FLAX_NS = {"jnp", "jax.numpy", "jax.nn", "jax.lax", "lax", "jax", "jsp.special", "jax.scipy.special"}
_MODULE_NS = {"nn", "nnx", "torch.nn", "flax.nnx"}
# Same function, different name: torch/jax name -> canonical (numpy's, where it has one).
_RENAMES = {
    "cat": "concatenate", "clamp": "clip", "pow": "power", "unsqueeze": "expand_dims", "permute": "transpose",
    "view": "reshape", "to": "astype", "numel": "size", "dim": "ndim", "new_zeros": "zeros", "mul": "multiply",
    "div": "divide", "sub": "subtract", "expand": "broadcast_to", "tensor": "asarray", "as_tensor": "asarray",
    "array": "asarray",
    "amax": "max", "amin": "min",
}
_LAYER_CLASSES = {"Linear": "Linear", "Embedding": "Embed", "Embed": "Embed", "Parameter": "Param",
                  "Param": "Param", "ModuleList": "List", "List": "List", "Module": "Module",
                  "Dropout": "Dropout", "Rngs": "Rngs"}
# Methods that also exist as `xp.<name>(array, ...)` functions: canonically written as functions.
_ARRAY_FUNCS = {
    "mean", "sum", "max", "min", "any", "all", "argmax", "argmin", "cumsum", "reshape", "swapaxes",
    "astype", "square", "exp", "log", "cos", "sin", "tanh", "abs", "sqrt", "rsqrt", "log1p", "sort",
    "argsort", "flip", "clip", "repeat", "broadcast_to", "expand_dims", "squeeze", "matmul", "softmax",
    "log_softmax", "transpose", "power", "prod", "std", "var", "round", "floor", "ceil", "sign",
    "maximum", "minimum", "take_along_axis", "logsumexp", "sigmoid", "silu", "relu", "gelu", "einsum",
    "cumprod", "triu", "tril", "norm",
}
# Functions whose second positional argument is the axis.
_AXIS_SECOND = {"mean", "sum", "max", "min", "any", "all", "argmax", "argmin", "cumsum", "softmax",
                "log_softmax", "flip", "sort", "argsort", "concatenate", "stack", "squeeze", "prod",
                "logsumexp", "expand_dims", "cumprod", "std", "var", "norm"}
_DROP_KWARGS = {"device", "rngs", "param_dtype", "kernel_init", "bias_init", "embedding_init", "precision"}
_ONE_SIDED_PARAMS = {"param_dtype", "rngs", "device", "precision"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _xp(name: str) -> ast.Attribute:
    return ast.Attribute(ast.Name("xp", ast.Load()), name, ast.Load())


def _call(func: ast.AST, args: list, keywords: list | None = None) -> ast.Call:
    return ast.Call(func, args, keywords or [])


def _kw(call: ast.Call, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None)


def _const_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _const_int(node.operand) is not None:
        return -_const_int(node.operand)
    return None


class Normaliser(ast.NodeTransformer):
    """Rewrites one twin's statement into the canonical form; `used` collects idiom ids."""

    def __init__(self, side: str):
        assert side in ("torch", "flax")
        self.side = side
        self.used: set[str] = set()

    # -- names -----------------------------------------------------------------------------------
    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        dotted = _dotted(node)
        if dotted is not None:
            head, _, leaf = dotted.rpartition(".")
            if dotted in ("torch.Tensor", "jax.Array", "jnp.ndarray", "torch.dtype", "jnp.dtype", "torch.device",
                          "jax.Device", "torch.Generator"):
                self.used.add("types")
                return ast.Name({"dtype": "DType", "device": "Device", "Generator": "Generator"}.get(leaf, "Array"),
                                ast.Load())
            if dotted in ("torch.bool",):
                self.used.add("namespace")
                return ast.Name("bool", ast.Load())
            if dotted in ("torch.long", "torch.int64", "jnp.int32", "torch.int32", "jnp.int64"):
                # Index dtypes: torch's default integer is int64, JAX's int32 (int64 needs x64 mode).
                self.used.add("int-dtype")
                return _xp("index_int")
            if head in _TORCH_NS or head in _FLAX_NS:
                if head not in ("jnp", "jax.numpy") or leaf in _RENAMES:
                    self.used.add("namespace")
                return _xp(_RENAMES.get(leaf, leaf))
            if head in _MODULE_NS and leaf in _LAYER_CLASSES:
                return ast.Name(_LAYER_CLASSES[leaf], ast.Load())
        node = self.generic_visit(node)
        # torch reductions and sorts return (values, indices)
        if node.attr in ("values", "indices") and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Attribute) and node.value.func.attr in ("max", "min", "sort", "topk"):
            call = node.value
            self.used.add("values-indices")
            if node.attr == "indices" and call.func.attr == "sort":
                call.func = ast.Attribute(call.func.value, "argsort", ast.Load()) if not _is_xp(call.func) else _xp("argsort")
            return call
        # kernel vs weight of a linear layer, read in place
        if self.side == "flax" and node.attr == "kernel":
            self.used.add("kernel")
            node.attr = "weight"
        return node

    # -- calls -----------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> ast.AST:
        # super().__init__(): torch-only, dropped.
        if _dotted(node.func) is None and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__" \
                and isinstance(node.func.value, ast.Call) and _dotted(node.func.value.func) == "super":
            self.used.add("super-init")
            return ast.Constant(None)
        dotted = _dotted(node.func)
        if dotted in ("jax.lax.stop_gradient", "lax.stop_gradient"):
            self.used.add("no-grad")
            return self.visit(node.args[0])
        node = self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "Param":  # nn.Parameter(...) / nnx.Param(...)
            self.used.add("param")
        if self.side == "flax" and isinstance(node.func, ast.Name) and node.func.id == "DType" \
                and len(node.args) == 1 and not node.keywords:
            self.used.add("dtype-object")
            return node.args[0]
        # keyword spellings
        for k in node.keywords:
            if k.arg == "diagonal" and isinstance(node.func, ast.Attribute) and node.func.attr in ("tril", "triu"):
                k.arg = "k"
            if k.arg in ("dim", "keepdim"):
                self.used.add("dim-axis")
                k.arg = {"dim": "axis", "keepdim": "keepdims"}[k.arg]
            if k.arg == "bias" and isinstance(node.func, ast.Name) and node.func.id == "Linear":
                k.arg = "use_bias"
        if self.side == "torch" and any(isinstance(a, ast.Attribute) and a.attr == "device" for a in node.args):
            self.used.add("device")
            node.args = [a for a in node.args if not (isinstance(a, ast.Attribute) and a.attr == "device")]
        for k in node.keywords:
            if k.arg == "dims" and isinstance(k.value, ast.Tuple) and len(k.value.elts) == 1:
                self.used.add("dim-axis")
                k.arg, k.value = "axis", k.value.elts[0]
        dropped = [k for k in node.keywords if k.arg in _DROP_KWARGS]
        if dropped:
            names = {k.arg for k in dropped}
            self.used.add("device" if "device" in names else "precision" if names == {"precision"} else "rngs")
            node.keywords = [k for k in node.keywords if k.arg not in _DROP_KWARGS]
        func = node.func
        # method calls
        if isinstance(func, ast.Attribute) and not _is_xp(func):
            name, obj = func.attr, func.value
            if name == "detach":
                self.used.add("detach")
                return obj
            if name in ("view", "to"):
                self.used.add("view-reshape" if name == "view" else "to-astype")
                name = _RENAMES[name]
            elif name in ("long", "float", "double", "bool", "int"):
                self.used.add("to-astype")
                target = {"long": _xp("index_int"), "float": _xp("float32"), "double": _xp("float64"),
                          "bool": ast.Name("bool", ast.Load()), "int": _xp("index_int")}[name]
                return _call(_xp("astype"), [obj, target])
            elif name == "transpose" and self.side == "torch" and len(node.args) == 2:
                self.used.add("transpose-swapaxes")
                name = "swapaxes"
            elif name == "transpose" and self.side == "flax" and len(node.args) >= 2:
                swap = _single_swap([_const_int(a) for a in node.args])
                if swap is not None:
                    self.used.add("transpose-swapaxes")
                    name, node.args = "swapaxes", [ast.Constant(swap[0]), ast.Constant(swap[1])]
            elif name == "unsqueeze":
                self.used.add("unsqueeze")
                name = "expand_dims"
            elif name == "masked_fill" and len(node.args) == 2:
                self.used.add("masked-fill")
                return self._where(node.args[0], node.args[1], obj)
            elif name == "gather" and len(node.args) == 2:
                self.used.add("gather")
                return _call(_xp("take_along_axis"), [obj, node.args[1]], [ast.keyword("axis", node.args[0])])
            elif name == "chunk" and len(node.args) >= 1:
                self.used.add("chunk-split")
                return self._function(_call(_xp("split"), [obj] + node.args, node.keywords))
            elif name == "clamp":
                self.used.add("clamp")
                name = "clip"
            elif name == "pow" and len(node.args) == 1 and _const_int(node.args[0]) == 2:
                self.used.add("method-function")
                return _call(_xp("square"), [obj])
            elif name == "expand" and self.side == "torch":
                self.used.add("method-function")
                return _call(_xp("broadcast_to"), [obj, ast.Tuple(node.args, ast.Load())])
            elif name in ("numel", "dim") and not node.args:
                self.used.add("namespace")
                return ast.Attribute(obj, {"numel": "size", "dim": "ndim"}[name], ast.Load())
            elif name == "new_zeros" and self.side == "torch":
                self.used.add("namespace")
            if name in _ARRAY_FUNCS:
                self.used.add("method-function")
                return self._function(_call(_xp(name), [obj] + node.args, node.keywords))
            node.func = ast.Attribute(obj, name, ast.Load())
            return _sorted_keywords(node)
        if _is_xp(func):
            return self._function(node)
        return _sorted_keywords(node)

    def _function(self, node: ast.Call) -> ast.AST:
        """Canonical spellings of `xp.<name>(...)` calls."""
        name = node.func.attr
        if name == "where" and len(node.args) == 3:
            return self._where(*node.args, flip=False)
        if name == "gather" and len(node.args) == 3 and self.side == "torch":
            self.used.add("gather")
            return _call(_xp("take_along_axis"), [node.args[0], node.args[2]], [ast.keyword("axis", node.args[1])])
        if name == "take_along_dim" and self.side == "torch":
            self.used.add("gather")
            node.func = _xp("take_along_axis")
            if len(node.args) == 3:
                node.keywords = [ast.keyword("axis", node.args[2])] + node.keywords
                node.args = node.args[:2]
            return _sorted_keywords(node)
        if name == "maximum" and len(node.args) == 2 and not _looks_array(node.args[1]):
            self.used.add("clamp")
            return _call(_xp("clip"), [node.args[0]], [ast.keyword("min", node.args[1])])
        if name == "clip" and len(node.args) >= 2:
            kws = [ast.keyword(k, v) for k, v in zip(("min", "max"), node.args[1:])]
            return _call(_xp("clip"), [node.args[0]], kws + node.keywords)
        if name == "one_hot":
            self.used.add("one-hot")
            dtype = _kw(node, "dtype")
            if dtype is not None:
                node.keywords = [k for k in node.keywords if k.arg != "dtype"]
                return _call(_xp("astype"), [node, dtype.value])
        if name in ("zeros", "ones", "full", "empty") and node.args:
            # torch.zeros(a, b) / jnp.zeros((a, b)) / jnp.zeros((a,)): one shape spelling
            shape_args = node.args[:1] if name == "full" or len(node.args) == 1 or \
                (self.side == "flax") else node.args
            rest = node.args[len(shape_args):]
            if self.side == "torch" and name != "full" and len(node.args) > 1:
                shape_args, rest = node.args, []
            shape = shape_args[0] if len(shape_args) == 1 else ast.Tuple(shape_args, ast.Load())
            if isinstance(shape, ast.Tuple) and len(shape.elts) == 1:
                shape = shape.elts[0]
            if self.side == "flax" and name != "full" and rest:
                node.keywords = [ast.keyword("dtype", rest[0])] + node.keywords
                rest = rest[1:]
            node.args = [shape] + rest
        if name == "arange":
            # an index range: torch's default int64, JAX's spelled-out int32 (the int-dtype idiom)
            node.keywords = [k for k in node.keywords if not (k.arg == "dtype" and ast.unparse(k.value) == "xp.index_int")]
        if name in ("asarray",):
            self.used.add("tensor-array")
        if name in ("dynamic_slice_in_dim",):
            self.used.add("dynamic-slice")
        if name in _AXIS_SECOND:
            return _sorted_keywords(self._axis(node))
        return _sorted_keywords(node)

    def _axis(self, node: ast.Call) -> ast.Call:
        """`xp.f(x, -1)` -> `xp.f(x, axis=-1)` for functions whose second argument is an axis."""
        if isinstance(node.func, ast.Attribute) and node.func.attr in _AXIS_SECOND and len(node.args) == 2 \
                and _const_int(node.args[1]) is not None and _kw(node, "axis") is None:
            node.keywords = [ast.keyword("axis", node.args[1])] + node.keywords
            node.args = node.args[:1]
        return node

    def _where(self, cond: ast.AST, a: ast.AST, b: ast.AST, flip: bool = True) -> ast.Call:
        """Canonical `xp.where(c, then, else)` with `c` never negated. From `masked_fill(c, v)`
        on `x` (flip): where(c, v, x)."""
        if isinstance(cond, ast.UnaryOp) and isinstance(cond.op, ast.Invert):
            cond, a, b = cond.operand, b, a
        return _call(_xp("where"), [cond, a, b])

    # -- subscripts ------------------------------------------------------------------------------
    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node = self.generic_visit(node)
        sl = node.slice
        # NNX variable read: v[...]
        if isinstance(sl, ast.Constant) and sl.value is Ellipsis and self.side == "flax":
            self.used.add("var-read")
            return node.value
        # x[:, None] -> expand_dims(x, 1)
        elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
        if any(isinstance(e, ast.Constant) and e.value is None for e in elts):
            nones = [i for i, e in enumerate(elts) if isinstance(e, ast.Constant) and e.value is None]
            full = all(isinstance(e, ast.Slice) and e.lower is e.upper is e.step is None for i, e in enumerate(elts)
                       if i not in nones)
            if len(nones) == 1 and full and nones[0] == len(elts) - 1 and len(elts) > 1:
                if self.side == "flax":
                    self.used.add("unsqueeze")
                return _call(_xp("expand_dims"), [node.value], [ast.keyword("axis", ast.Constant(nones[0]))])
        return node

    # -- statements ------------------------------------------------------------------------------
    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        node = self.generic_visit(node)
        # y = y.at[i].set(v)  ->  y[i] = v
        v = node.value
        if len(node.targets) == 1 and isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) \
                and v.func.attr == "set" and len(v.args) == 1 and isinstance(v.func.value, ast.Subscript) \
                and isinstance(v.func.value.value, ast.Attribute) and v.func.value.value.attr == "at":
            self.used.add("inplace-write")
            base = v.func.value.value.value
            return ast.copy_location(ast.Assign([ast.Subscript(base, v.func.value.slice, ast.Store())], v.args[0]),
                                     node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        if node.annotation is not None:
            self.used.add("types")
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        if node.name == "forward" and self.side == "torch":
            self.used.add("forward")
            node.name = "__call__"
        a = node.args
        kw = list(zip(a.kwonlyargs, a.kw_defaults))
        if any(x.arg in _ONE_SIDED_PARAMS for x, _ in kw):
            self.used.add("rngs" if self.side == "flax" else "device")
        kw = [(x, d) for x, d in kw if x.arg not in _ONE_SIDED_PARAMS]
        a.kwonlyargs, a.kw_defaults = [x for x, _ in kw], [d for _, d in kw]
        defaults = [None] * (len(a.args) - len(a.defaults)) + list(a.defaults)
        pos = list(zip(a.args, defaults))
        if any(x.arg in _ONE_SIDED_PARAMS for x, _ in pos):
            self.used.add("rngs" if self.side == "flax" else "device")
            pos = [(x, d) for x, d in pos if x.arg not in _ONE_SIDED_PARAMS]
            a.args = [x for x, _ in pos]
            a.defaults = [d for _, d in pos if d is not None]
        node.returns = None
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.args = self.visit(node.args)
        return node  # the body is compared statement by statement, not here

    def visit_With(self, node: ast.With) -> ast.AST:
        items = [i for i in node.items if _dotted(i.context_expr.func if isinstance(i.context_expr, ast.Call)
                                                  else i.context_expr) not in ("torch.no_grad", "torch.inference_mode",
                                                                               "torch.enable_grad")]
        if len(items) != len(node.items):
            self.used.add("no-grad")
        node.items = [self.visit(i) for i in items]
        return node


def _sorted_keywords(node: ast.AST) -> ast.AST:
    """Keyword arguments in name order (`**kwargs` last, in their order): the order never matters."""
    if isinstance(node, ast.Call):
        named = sorted((k for k in node.keywords if k.arg is not None), key=lambda k: k.arg)
        node.keywords = named + [k for k in node.keywords if k.arg is None]
    return node


def _is_xp(func: ast.AST) -> bool:
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "xp"


def _looks_array(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and _is_xp(node.func)


def _single_swap(perm: list[int | None]) -> tuple[int, int] | None:
    """(a, b) when `perm` is the identity with two entries swapped (a numpy transpose that is a
    torch two-axis transpose), else None."""
    if any(p is None for p in perm) or sorted(perm) != list(range(len(perm))):
        return None
    moved = [i for i, p in enumerate(perm) if p != i]
    return (moved[0], moved[1]) if len(moved) == 2 else None


# ---- pairs of statements no rewrite can equate ------------------------------------------------
@dataclass(frozen=True)
class PairIdiom:
    """Recognises a torch statement and a Flax statement that differ for a named idiom."""

    idiom: str
    torch: re.Pattern
    flax: re.Pattern

    def matches(self, torch_src: str, flax_src: str) -> bool:
        return bool(self.torch.search(torch_src) and self.flax.search(flax_src))


PAIR_IDIOMS: list[PairIdiom] = [
    # buf[..., start:end] = x  against  buf = lax.dynamic_update_slice(buf, x, index)
    PairIdiom("inplace-write", re.compile(r"\[[^\]]*:[^\]]*\]\s*=[^=]"), re.compile(r"dynamic_update_slice|\.at\[")),
    PairIdiom("inplace-write", re.compile(r"\.(zero_|copy_|fill_|index_add_)\("), re.compile(r"\.at\[|dynamic_update_slice")),
    # layer construction: NNX takes rngs / param_dtype / initializers, torch re-initialises after
    PairIdiom("rngs", re.compile(r"=\s*nn\.(Linear|Embedding|Parameter|ModuleList)\("),
              re.compile(r"=\s*nnx\.(Linear|Embed|Param|List)\(")),
    PairIdiom("dynamic-slice", re.compile(r"\[[^\]]*:[^\]]*\]"), re.compile(r"dynamic_slice")),
    PairIdiom("pad", re.compile(r"F\.pad\("), re.compile(r"jnp\.pad\(")),
    PairIdiom("split-sizes", re.compile(r"torch\.split\("), re.compile(r"jnp\.split\(")),
    PairIdiom("rng", re.compile(r"torch\.(rand|randn|randint|multinomial)\(|generator="), re.compile(r"jax\.random\.")),
    PairIdiom("dataclass", re.compile(r"@dataclass"), re.compile(r"@flax\.struct\.dataclass")),
]

# One-sided statements that an idiom fully explains (the other framework needs nothing there).
ONE_SIDED_IDIOMS: list[tuple[str, str, re.Pattern]] = [
    ("torch", "super-init", re.compile(r"^\s*super\(\)\.__init__\(\)\s*$")),
    ("torch", "no-grad", re.compile(r"^\s*with torch\.(no_grad|inference_mode)\(\):\s*$")),
    ("torch", "device", re.compile(r"^\s*\w+ = [\w.]+\.device\s*$")),
    ("torch", "device", re.compile(r"^\s*with torch\.device\(")),
    ("torch", "rngs", re.compile(r"^\s*(nn\.init\.\w+_|init_weights)\(")),
    ("flax", "rngs", re.compile(r"^\s*\w+ = (nnx\.initializers\.|dict\([^)]*\b(rngs|kernel_init)=)", re.S)),
    ("flax", "precision", re.compile(r"^\s*self\.precision = precision\s*$")),
    ("torch", "autograd", re.compile(r"^\s*\w+\.(zero_grad|backward|step)\(\)\s*$")),
    ("torch", "train-mode", re.compile(r"^\s*\w+\.(eval|train)\(\)\s*$")),
    ("flax", "rng", re.compile(r"^\s*\w+ = (None if \w+ is None else )?jax\.random\.(fold_in|split)\(")),
    ("flax", "traced", re.compile(r"^\s*(\w+ = concrete_int\(|.*jax\.lax\.(while_loop|scan|fori_loop)\(|if isinstance\(\w+, jax\.core\.Tracer\))")),
]


def normalise(node: ast.AST, side: str) -> tuple[str, frozenset[str]]:
    """The canonical text of one statement (or a compound statement's header node) and the idiom
    ids the rewrite used."""
    n = Normaliser(side)
    tree = n.visit(clone(node))
    if tree is not None:
        ast.fix_missing_locations(tree)
    text = ast.unparse(tree) if tree is not None else ""
    return text, frozenset(n.used)


def clone(node):
    """A deep copy of a syntax tree (several times faster than `copy.deepcopy`)."""
    if isinstance(node, list):
        return [clone(x) for x in node]
    if not isinstance(node, ast.AST):
        return node
    new = type(node)(**{f: clone(getattr(node, f, None)) for f in node._fields})
    for a in ("lineno", "col_offset", "end_lineno", "end_col_offset"):
        if hasattr(node, a):
            setattr(new, a, getattr(node, a))
    return new
