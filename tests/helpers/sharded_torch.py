"""The torch twin on torch.distributed (gloo, 127.0.0.1) against itself in one process.

    python -m tests.helpers.sharded_torch DIR [WORLD]

Saves a tiny float64 causal LM to DIR and its single-process logits, loss and gradients; then
WORLD processes (torch.multiprocessing) each load it, cut it with `torch_impl.sharding.shard_model`
and compare. WORLD 2: two meshes in turn — tensor parallel (`tensor=2`, with greedy generate and
a tied head) and FSDP2 (`fsdp=2`, each rank a slice of the batch, generating its rows) — then
3 training steps (with dropout, and labels the FSDP ranks count unevenly) from a fresh sharded
load against 3 single-process steps. WORLD 4: the 2-D meshes of `_rank_2d` and both saves of a sharded model.
Prints one JSON line per mesh and rank; exits 1 on a mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401 - imported once here, inherited by the forked ranks
import torch.distributed.tensor.parallel  # noqa: F401
import torch.multiprocessing as mp

from torch_impl import ForCausalLM
from weights.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
TOL = 1e-12  # float64: sharded sums differ from unsharded ones by rounding only
NEW_TOKENS = 5  # greedy generate() under tensor parallelism
MESHES_2D = (("fsdp", "tensor"), ("data", "fsdp"))  # world 4: FSDP2 x tensor parallel, HSDP
DROPOUT = 0.1  # in the training steps


def _inputs() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 6)))


def _labels() -> torch.Tensor:
    """The training labels: the inputs, with the last rows' tails ignored (-100), so the FSDP
    ranks count different numbers of labels (10 and 4): the step must weight them by the global
    count (`torch_impl.training._data_parallel_sum`), not average the ranks' means."""
    labels = _inputs().clone()
    labels[len(labels) // 2:, 3:] = -100
    return labels


def _resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameter storage this rank holds (a DTensor's local shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """3 AdamW steps (`torch_impl.training.train_step`) with warmup, decay and clipping, and
    dropout at every site: an FSDP rank must draw the masks of its rows' places in the whole batch
    (`torch_impl.training._first_row`), a tensor-parallel rank the attention map's masks of its
    heads' places among all heads (`torch_impl.layers.attention._attention_dropout`); an FSDP rank
    weights its labels by the whole batch's count (`_labels`: the FSDP ranks count 10 and 4)."""
    from torch_impl.layers.dropout import Dropout
    from torch_impl.training import TrainingHParams, make_optimizer, train_step

    for module in model.modules():  # on for training only; the forward comparisons run without it
        if isinstance(module, Dropout):
            module.rate = DROPOUT
    model.train()
    optimizer = make_optimizer(model, TrainingHParams(learning_rate=1e-3, weight_decay=0.01, warmup_steps=1,
                                                      max_steps=10))
    for _ in range(3):
        train_step(model, optimizer, {"input_ids": input_ids, "labels": labels})


def _tensor_extras(directory: str, mesh, model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Under tensor parallelism: greedy `generate()` (each rank's cache holding its kv heads) and
    a tied LM head (the vocab-parallel embedding as head), against the single process."""
    want = np.load(Path(directory) / "reference.npz")
    model.eval()
    tokens = model.generate(ids, max_new_tokens=NEW_TOKENS)
    tied = ForCausalLM.from_pretrained(Path(directory) / "tied", dtype=torch.float64, mesh=mesh)
    out = tied(ids, labels=ids)
    out.loss.backward()
    return dict(tokens_equal=bool(torch.equal(tokens, torch.from_numpy(want["tokens"]))),
                tied_logits_err=float((out.logits.detach() - torch.from_numpy(want["tied.logits"])).abs().max()),
                tied_grad_err=max(float((_full(p.grad) - torch.from_numpy(want["tied.grad." + n])).abs().max())
                                  for n, p in tied.named_parameters()))


def _fsdp_generate(want: dict, model: torch.nn.Module, rows: torch.Tensor, rank: int) -> dict:
    """Under FSDP2: greedy `generate()` of this rank's rows (the whole model gathered, no
    collective in the decode loop) against the single process on those rows. Rank 0's rows stop
    after one token (their first tokens are the eos), rank 1's run on: different stop points."""
    model.eval()
    tokens = model.generate(rows, max_new_tokens=NEW_TOKENS, eos_token_id=want["fsdp.eos"].tolist())
    return dict(dp_tokens_equal=bool(torch.equal(tokens, torch.from_numpy(want[f"fsdp.tokens{rank}"]))),
                dp_new_tokens=tokens.shape[1] - rows.shape[1])


def _rank(rank: int, world: int, port: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from torch_impl.sharding import param_shardings

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        want = np.load(Path(directory) / "reference.npz")
        ids = _inputs()
        rows = []
        for axis in ("tensor", "fsdp"):
            started = time.perf_counter()
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=(axis,))
            # Sharded loading: cut on the meta device, then each rank reads its slices.
            model = ForCausalLM.from_pretrained(directory, dtype=torch.float64, mesh=mesh)
            total = sum(p.numel() * 8 for p in model.parameters())  # DTensor numel is the whole tensor's
            axes = param_shardings(model, mesh)
            # Tensor parallel: every rank sees the whole batch. FSDP: each rank its rows; the
            # mean of equal-sized rank losses is the whole batch's, as FSDP averages gradients.
            part = slice(None) if axis == "tensor" else slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
            out = model(ids[part], labels=ids[part])
            out.loss.backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            loss = loss / world  # tensor: every rank holds the same loss; fsdp: the mean of rank means
            grad_err = 0.0
            split = 0
            wrong: list[str] = []
            for name, p in model.named_parameters():
                grad_err = max(grad_err, float((_full(p.grad) - torch.from_numpy(want["grad." + name])).abs().max()))
                placements = getattr(p, "placements", ())
                split += any(isinstance(pl, Shard) for pl in placements)
                # The table's dimension for this mesh axis (FSDP2 splits the rest along dimension 0).
                placement = Shard(axes[name].index(axis)) if axis in axes[name] else Shard(0) if axis == "fsdp" else None
                if tuple(placements) != ((placement,) if placement is not None else ()):
                    wrong.append(f"{name}: {placements} != {placement}")
            row = dict(mesh={axis: world}, rank=rank, params=len(axes), split=split, wrong_sharding=wrong,
                       logits_err=float((out.logits.detach() - torch.from_numpy(want["logits"])[part]).abs().max()),
                       loss_err=abs(float(loss) - float(want["loss"])), grad_err=grad_err,
                       resident_fraction=_resident_bytes(model) / total)
            row["ok"] = max(row["logits_err"], row["loss_err"], grad_err) <= TOL and split > 0 and not wrong
            if axis == "tensor":
                row.update(_tensor_extras(directory, mesh, model, ids))
                row["ok"] = row["ok"] and row["tokens_equal"] and max(row["tied_logits_err"], row["tied_grad_err"]) <= TOL
            # K = 3 train_step updates from a fresh sharded load: every parameter as one process's.
            model = ForCausalLM.from_pretrained(directory, dtype=torch.float64, mesh=mesh)
            if axis == "fsdp":  # data parallel generate() first (FSDP2's root not yet picked), then training
                row.update(_fsdp_generate(want, model, ids[part], rank))
                row["ok"] = row["ok"] and row["dp_tokens_equal"]
            row["train_param_err"] = _trained_error(model, ids[part], _labels()[part], want)
            row["ok"] = row["ok"] and row["train_param_err"] <= TOL
            row["seconds"] = time.perf_counter() - started  # this mesh's share of the launch (--durations)
            rows.append(row)
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _trained_error(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, want) -> float:
    """`_train`'s 3 steps on the sharded `model`: the largest difference of a parameter from the
    one process's trained value."""
    _train(model, ids, labels)
    return max(float((_full(p).detach() - torch.from_numpy(want["trained." + n])).abs().max())
               for n, p in model.named_parameters())


def _rank_2d(rank: int, world: int, port: int, directory: str) -> None:
    """World 4, two 2-D meshes: FSDP2 x tensor parallel (`fsdp=2, tensor=2`) and HSDP
    (`data=2, fsdp=2`). Each loaded sharded; rows split over the data/fsdp ranks (tensor ranks
    share theirs); forward and gradients against the single process; then both saves of the
    sharded model (gathered; one file set per process), checked by `run_all` once all ranks end,
    greedy `generate()` of the rank's rows, and `_train`'s 3 steps from a fresh sharded load."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        want = np.load(Path(directory) / "reference.npz")
        ids = _inputs()
        rows = []
        for names in MESHES_2D:
            started = time.perf_counter()
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
            model = ForCausalLM.from_pretrained(directory, dtype=torch.float64, mesh=mesh)
            total = sum(p.numel() * 8 for p in model.parameters())
            coordinate = dict(zip(names, mesh.get_coordinate()))
            # This rank's rows: its position among the row-splitting (data, fsdp) ranks.
            row_axes = [a for a in names if a != "tensor"]
            groups = int(np.prod([mesh.size(names.index(a)) for a in row_axes]))
            k = int(np.ravel_multi_index([coordinate[a] for a in row_axes], [2] * len(row_axes)))
            part = slice(k * len(ids) // groups, (k + 1) * len(ids) // groups)
            out = model(ids[part], labels=ids[part])
            out.loss.backward()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)  # equal-sized parts, each counted by as many ranks: the whole batch's mean
            row = dict(mesh=dict(zip(names, (2, 2))), rank=rank,
                       logits_err=float((out.logits.detach() - torch.from_numpy(want["logits"])[part]).abs().max()),
                       loss_err=abs(float(loss) / world - float(want["loss"])),
                       grad_err=max(float((_full(p.grad) - torch.from_numpy(want["grad." + n])).abs().max())
                                    for n, p in model.named_parameters()),
                       resident_fraction=_resident_bytes(model) / total)
            row["ok"] = max(row["logits_err"], row["loss_err"], row["grad_err"]) <= TOL
            tag = "_".join(names)
            if names == ("fsdp", "tensor"):
                model.save_pretrained(Path(directory) / f"gathered_{tag}")
            model.save_pretrained(Path(directory) / f"pieces_{tag}", per_process=True)
            # Data-parallel greedy generate() of this rank's rows (FSDP2 x TP: the tensor ranks' shared rows).
            tokens = model.eval().generate(ids[part], max_new_tokens=NEW_TOKENS)
            row["dp_tokens_equal"] = bool(torch.equal(tokens, torch.from_numpy(want["tokens"])[part]))
            row["ok"] = row["ok"] and row["dp_tokens_equal"]
            # K = 3 train_step updates from a fresh sharded load (both fixes of the world-2 steps at
            # once under FSDP2 x TP; HSDP sums the label counts over two axes): one process's parameters.
            model = ForCausalLM.from_pretrained(directory, dtype=torch.float64, mesh=mesh)
            row["train_param_err"] = _trained_error(model, ids[part], _labels()[part], want)
            row["ok"] = row["ok"] and row["train_param_err"] <= TOL
            row["seconds"] = time.perf_counter() - started  # this mesh's share of the launch (--durations)
            rows.append(row)
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _saved_equal(directory: Path) -> dict:
    """Both saves of the world-4 run load unsharded to exactly the saved model's parameters."""
    from weights.pieces import PIECES_INDEX, consolidate

    want = {n: p.detach() for n, p in ForCausalLM.from_pretrained(directory, dtype=torch.float64).named_parameters()}
    out: dict = {}
    for saved in sorted(directory.glob("gathered_*")) + sorted(directory.glob("pieces_*")):
        if saved.name.startswith("pieces_"):
            files = sorted(p.name for p in saved.glob("model-rank*.safetensors"))
            out[saved.name + ".files"] = len(files) + (saved / PIECES_INDEX).is_file()
            saved = consolidate(saved, directory / f"hf_{saved.name}")
        got = dict(ForCausalLM.from_pretrained(saved, dtype=torch.float64).named_parameters())
        out[saved.name] = all(torch.equal(got[n], want[n]) for n in want) and set(got) == set(want)
    return out


def _forked(rank: int, fn, world: int, port: int, directory: str) -> None:
    # One thread per rank (the ranks share 2 cores), and none of the parent's OpenMP pool, which
    # a forked child must not enter.
    torch.set_num_threads(1)
    fn(rank, world, port, directory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(directory: str, world: int = 2) -> bool:
    torch.manual_seed(0)
    reference = ForCausalLM(CONFIG, dtype=torch.float64)
    reference.save_pretrained(directory)
    ids = _inputs()
    out = reference(ids, labels=ids)
    out.loss.backward()
    grads = {"grad." + n: p.grad.numpy().copy() for n, p in reference.named_parameters()}
    tokens = reference.eval().generate(ids, max_new_tokens=NEW_TOKENS)
    # FSDP2 generate: each rank's rows alone in one process, rank 0's first new tokens as eos.
    eos = np.unique(tokens[:2, ids.shape[1]].numpy())
    half = len(ids) // 2
    dp_tokens = {f"fsdp.tokens{k}": reference.generate(ids[k * half:(k + 1) * half], max_new_tokens=NEW_TOKENS,
                                                      eos_token_id=eos.tolist()).numpy() for k in range(2)}
    _train(reference, ids, _labels())
    # The same model with its LM head tied to the embedding (a checkpoint without lm_head.weight).
    tied = ForCausalLM(dataclasses.replace(CONFIG, tie_word_embeddings=True), dtype=torch.float64)
    tied.save_pretrained(Path(directory) / "tied")
    tied_out = tied(ids, labels=ids)
    tied_out.loss.backward()
    np.savez(Path(directory) / "reference.npz", logits=out.logits.detach().numpy(), loss=out.loss.detach().numpy(),
             tokens=tokens.numpy(), **{"fsdp.eos": eos}, **dp_tokens, **grads,
             **{"trained." + n: p.detach().numpy() for n, p in reference.named_parameters()},
             **{"tied.logits": tied_out.logits.detach().numpy()},
             **{"tied.grad." + n: p.grad.numpy().copy() for n, p in tied.named_parameters()})
    # Forked, not spawned: the ranks inherit this module's imports (a spawned rank re-imports torch
    # and the distributed packages: 7-13 s of this test on 2 cores); each computes on one thread.
    mp.start_processes(_forked, args=(_rank if world == 2 else _rank_2d, world, _free_port(), directory),
                       nprocs=world, join=True, start_method="fork")
    ok = True
    for rank in range(world):
        for row in json.loads((Path(directory) / f"rank{rank}.json").read_text()):
            ok &= row["ok"]
            print(json.dumps(row), flush=True)
    if world == 4:
        saved = _saved_equal(Path(directory))
        ok &= all(v is True or v == world + 1 for v in saved.values())
        print(json.dumps(dict(saved=saved)), flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(0 if run_all(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2) else 1)
