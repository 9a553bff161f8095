"""One of two JAX processes on 127.0.0.1 (`jax.distributed.initialize`), 4 CPU devices each, one
(fsdp=2, tensor=4) mesh over all 8: the Flax twin loaded sharded, each process reading only the
slices of its own devices, and its forward logits equal to the one-device run; then the sharded
model saved both ways (gathered: DIR/../flax_gathered; per process: DIR/../flax_pieces).

    python -m tests.helpers.sharded_flax_processes PROCESS_ID PORT DIR

DIR holds a float64 causal LM. Prints one JSON line: the process' bytes read from the
checkpoint (against the whole model's) and the logits' error against the unsharded model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if "jax" in sys.modules:
    raise RuntimeError("tests.helpers.sharded_flax_processes must start before jax is imported")
# XLA's backend optimisations off: compiling (one program per mesh and quantity) is most of this
# run's time, and they save nothing on a tiny model (53 -> 38 s for sharded_flax on 2 cores). Both
# sides of every comparison (sharded, one device) are compiled alike; float64 keeps them within 1e-12.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                           + FAST_COMPILE).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes

from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

import flax_impl.checkpoint as checkpoint  # noqa: E402
from flax_impl import ForCausalLM  # noqa: E402
from flax_impl.sharding import process_count  # noqa: E402


def main(process_id: int, port: int, directory: str) -> None:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    read = [0]
    copy = checkpoint.contiguous

    def counted(src: np.ndarray, dtype=None) -> np.ndarray:  # every slice a device reads goes through here
        out = copy(src, dtype)
        read[0] += out.nbytes
        return out

    checkpoint.contiguous = counted
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))  # fsdp across the processes
    model = ForCausalLM.from_pretrained(directory, mesh=mesh)
    checkpoint.contiguous = copy
    total = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 6)).astype(np.int32)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x).logits)
    with jax.set_mesh(mesh):
        rows = ids[2 * process_id:2 * process_id + 2]  # this process' rows of the batch
        logits = forward(params, multihost_utils.host_local_array_to_global_array(rows, mesh, PartitionSpec("fsdp")))
    got = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    # Both saves of the sharded model (every process calls them): gathered by process 0, and pieces.
    model.save_pretrained(Path(directory).parent / "flax_gathered")
    model.save_pretrained(Path(directory).parent / "flax_pieces", per_process=True)
    want = np.asarray(ForCausalLM.from_pretrained(directory)(jax.numpy.asarray(ids)).logits)  # this process' first device alone
    print(json.dumps(dict(process=process_id, devices=len(jax.devices()), local=len(jax.local_devices()),
                          processes=process_count(mesh),
                          read_fraction=read[0] / total, logits_err=float(np.abs(got - want).max()))), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
