"""The `sharding` section of `make bench`: peak host memory of a sharded `from_pretrained`, per
process, on the mid-size LLaMA (`generation.MID`, float32, 623 MB) written once into `cache_dir()`.

N processes (torch.multiprocessing, gloo on 127.0.0.1) each load the checkpoint cut over a
`fsdp=N` and a `tensor=N` mesh (torch twin). Each rank reports the rise of its peak RSS (VmHWM)
over its own peak after the imports and the process group: what loading its shards cost it.
The issue's goal: at most 1/N of the model plus one tensor (the largest, the 131 MB embedding)
per process — each rank reads its slices of the memory-mapped file, one tensor at a time.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from parity.bench import Row, cache_dir, run_child, section

__all__ = ["bench_sharding", "ensure_mid_checkpoint"]

WORLDS = (2, 4)
AXES = ("fsdp", "tensor")


def ensure_mid_checkpoint(root: Path) -> Path:
    """The mid-size LLaMA as a float32 checkpoint (synthetic weights, 623 MB), generated once."""
    import numpy as np

    from parity.bench.checkpoints import ensure_synthetic
    from parity.bench.generation import MID

    return ensure_synthetic(root, "mid-f32", MID, np.float32, "mid-size float32")


def _peak_rss() -> int:
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork + exec).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _load_rank(rank: int, world: int, port: int, path: str, axis: str, out: str) -> None:
    """One rank: imports and process group first (its baseline peak), then the sharded load."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import torch.distributed.tensor  # noqa: F401 - imported before the baseline, as the load needs it
    from torch_impl import ForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(axis,))
        dist.barrier()
        before = _peak_rss()
        model = ForCausalLM.from_pretrained(path, dtype=torch.float32, mesh=mesh)
        after = _peak_rss()
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
        Path(out, f"rank{rank}.json").write_text(json.dumps(dict(before=before, after=after, held=held)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_load(path: str, world: int, axis: str, out: str) -> list[dict]:
    """Run `_load_rank` in `world` processes; their figures, by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_load_rank, args=(world, port, path, axis, out), nprocs=world, join=True)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@section("sharding")
def bench_sharding() -> list[Row]:
    """Per-process peak RSS of the torch twin's sharded `from_pretrained` on the mid-size model."""
    import tempfile

    from weights.checkpoint import CheckpointReader

    src = ensure_mid_checkpoint(cache_dir())
    with CheckpointReader(src) as r:
        sizes = [r.nbytes(k) for k in r.keys()]
    model_bytes, largest = sum(sizes), max(sizes)
    rows = [Row("sharding", "mid-size LLaMA float32: model bytes / largest tensor",
                f"{model_bytes / 1e6:.0f} MB / {largest / 1e6:.0f} MB")]
    for world in WORLDS:
        for axis in AXES:
            with tempfile.TemporaryDirectory(prefix="twinlm-bench-sharding-") as out:
                ranks = run_child(f"""
import json
from parity.bench.sharding import spawn_load
print(json.dumps({{"ranks": spawn_load({str(src)!r}, {world}, {axis!r}, {out!r})}}))
""", what=f"sharded load over {axis}={world}")["ranks"]
            rise = max(r["after"] - r["before"] for r in ranks)
            goal = model_bytes / world + largest
            rows.append(Row("sharding", f"torch from_pretrained over {axis}={world}: peak RSS rise, worst rank",
                            f"{rise / 1e6:.0f} MB (holds {max(r['held'] for r in ranks) / 1e6:.0f} MB; "
                            f"peak {max(r['after'] for r in ranks) / 1e9:.2f} GB with imports)",
                            f"<= 1/{world} model + 1 tensor = {goal / 1e6:.0f} MB", rise <= goal))
    return rows


if __name__ == "__main__":  # python -m parity.bench.sharding: this section alone
    from parity.bench import print_table

    print_table(bench_sharding())
    sys.exit(0)
