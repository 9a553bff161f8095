"""The Flax twin on simulated device meshes against itself on one device (run as a subprocess:
8 CPU devices must be requested before jax is imported).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.helpers.sharded_flax DIR

Saves a tiny float64 causal LM to DIR, then for each mesh loads it sharded
(`from_pretrained(dir, mesh=...)`: each device reads its slice), checks every parameter's
`.sharding` against the partition table, and compares forward logits, loss, every gradient and
greedy tokens with the unsharded run; then the layers scanned on one mesh; then 3 training steps
on one mesh. Prints one JSON line per
mesh and one for the training steps; exits 1 on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys

if "jax" in sys.modules:
    raise RuntimeError("tests.helpers.sharded_flax must start before jax is imported (device count)")
# XLA's backend optimisations off: compiling (one program per mesh and quantity) is most of this
# run's time, and they save nothing on a tiny model (53 -> 38 s for sharded_flax on 2 cores). Both
# sides of every comparison (sharded, one device) are compiled alike; float64 keeps them within 1e-12.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           + FAST_COMPILE).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

jax.config.update("jax_enable_x64", True)

from flax_impl import ForCausalLM  # noqa: E402
from flax_impl.sharding import PARTITION_RULES, param_shardings  # noqa: E402
from flax_impl.training import TrainingHParams, make_optimizer, train_step  # noqa: E402
from weights.config import ModelConfig  # noqa: E402
from weights.names import hf_name  # noqa: E402

# Every split dimension divides by 8 (q/k/v/o 32 and 16 wide, MLP 64, vocab 64, model 32).
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
MESHES = (((8,), ("fsdp",)), ((2, 4), ("data", "tensor")), ((1, 8), ("fsdp", "tensor")))
TOL = 1e-12  # float64: sharded sums differ from unsharded ones by rounding only


def loss_and_grads(model: ForCausalLM, input_ids: jax.Array) -> tuple[jax.Array, jax.Array, nnx.State]:
    """(loss, logits, gradients of every parameter) in one jitted program."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params: nnx.State, input_ids: jax.Array):
        def loss(p):
            out = nnx.merge(graphdef, p)(input_ids, labels=input_ids)
            return out.loss, out.logits
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, logits, grads

    return run(params, input_ids)


def run_all(directory: str) -> bool:
    reference = ForCausalLM(CONFIG, dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    reference.save_pretrained(directory)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 6)), jnp.int32)
    want_loss, want_logits, want_grads = loss_and_grads(reference, ids)
    want_tokens = reference.generate(ids[:2], max_new_tokens=4)
    want_flat = {hf_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(want_grads)}
    ok = True
    for shape, axes in MESHES:
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), axes)
        model = ForCausalLM.from_pretrained(directory, mesh=mesh)
        wanted = param_shardings(model, mesh, PARTITION_RULES)
        wrong = [hf_name(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 if not v.get_value().sharding.is_equivalent_to(wanted[hf_name(p)], v.get_value().ndim)]
        split = sum(any(a is not None for a in s.spec) for s in wanted.values())
        with jax.set_mesh(mesh):
            ids_on_mesh = jax.device_put(ids, NamedSharding(mesh, PartitionSpec(axes[0])))
            loss, logits, grads = loss_and_grads(model, ids_on_mesh)
            tokens = model.generate(ids[:2], max_new_tokens=4)
        grad_err = max(float(np.abs(np.asarray(v.get_value()) - want_flat[hf_name(p)]).max())
                       for p, v in nnx.to_flat_state(grads))
        row = dict(mesh=dict(zip(axes, shape)), params=len(wanted), split=split, wrong_sharding=wrong,
                   logits_err=float(np.abs(np.asarray(logits) - np.asarray(want_logits)).max()),
                   loss_err=abs(float(loss) - float(want_loss)), grad_err=grad_err,
                   tokens_equal=bool((np.asarray(tokens) == np.asarray(want_tokens)).all()),
                   logits_sharded=str(logits.sharding.spec))
        row["ok"] = (not wrong and split > 0 and row["logits_err"] <= TOL and row["loss_err"] <= TOL
                     and grad_err <= TOL and row["tokens_equal"])
        ok &= row["ok"]
        print(json.dumps(row), flush=True)
    ok &= scanned(directory, want_logits, want_flat, want_tokens, ids)
    ok &= train_steps(directory)
    return ok


def scanned(directory: str, want_logits: jax.Array, want_grads: dict[str, np.ndarray], want_tokens: jax.Array,
            ids: jax.Array) -> bool:
    """The layers scanned (`DecoderModel.scan_layers`: parameters stacked inside the jitted
    program) on the (2, 4) data x tensor mesh: the unsharded loop's logits, gradients and tokens."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "tensor"))
    model = ForCausalLM.from_pretrained(directory, mesh=mesh)
    model.model.scan_layers = True
    with jax.set_mesh(mesh):
        _, logits, grads = loss_and_grads(model, jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data"))))
        tokens = model.generate(ids[:2], max_new_tokens=4)
    row = dict(scan_layers=True, mesh={"data": 2, "tensor": 4},
               logits_err=float(np.abs(np.asarray(logits) - np.asarray(want_logits)).max()),
               grad_err=max(float(np.abs(np.asarray(v.get_value()) - want_grads[hf_name(p)]).max())
                            for p, v in nnx.to_flat_state(grads)),
               tokens_equal=bool((np.asarray(tokens) == np.asarray(want_tokens)).all()))
    row["ok"] = row["logits_err"] <= TOL and row["grad_err"] <= TOL and row["tokens_equal"]
    print(json.dumps(row), flush=True)
    return row["ok"]


def train_steps(directory: str) -> bool:
    """K = 3 AdamW steps (`flax_impl.training.train_step`, 2 micro-batches each) on the (2, 4)
    data x tensor mesh against one device: the losses and every parameter after the steps agree,
    and the parameters keep the table's shardings."""
    hparams = TrainingHParams(learning_rate=1e-3, weight_decay=0.01, warmup_steps=1, max_steps=10)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (8, 6)), jnp.int32)

    def run(model: ForCausalLM, input_ids: jax.Array) -> tuple[list[float], dict[str, jax.Array]]:
        model.train()
        optimizer = make_optimizer(model, hparams)
        batch = {"input_ids": input_ids, "labels": input_ids}
        losses = [float(train_step(model, optimizer, batch, accumulation_steps=2)["loss"]) for _ in range(3)]
        return losses, {hf_name(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

    want_losses, want = run(ForCausalLM.from_pretrained(directory), ids)
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "tensor"))
    model = ForCausalLM.from_pretrained(directory, mesh=mesh)
    wanted = param_shardings(model, mesh, PARTITION_RULES)
    with jax.set_mesh(mesh):
        losses, got = run(model, jax.device_put(ids, NamedSharding(mesh, PartitionSpec("data"))))
    row = dict(train_steps=3, mesh={"data": 2, "tensor": 4},
               loss_err=max(abs(a - b) for a, b in zip(losses, want_losses)),
               param_err=max(float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()) for k in want),
               wrong_sharding=[k for k, v in got.items() if not v.sharding.is_equivalent_to(wanted[k], v.ndim)])
    row["ok"] = row["loss_err"] <= TOL and row["param_err"] <= TOL and not row["wrong_sharding"]
    print(json.dumps(row), flush=True)
    return row["ok"]


if __name__ == "__main__":
    sys.exit(0 if run_all(sys.argv[1]) else 1)
