"""Safetensors IO: our writer equals the reference writer byte for byte, our reader equals the
reference reader bit for bit, and every malformed file gets its documented error."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as st_numpy
import safetensors.torch as st_torch
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from weights.errors import (LOAD_ERRORS, DataOffsetError, HeaderError, SafetensorsFormatError,
                            TruncatedFileError, UnknownDtypeError)
from weights.safetensors_io import DTYPES, MAX_HEADER_SIZE, SafetensorsFile, TensorSpec, load_file, release_pages
from weights.safetensors_writer import SafetensorsWriter, save_file

BF16 = np.dtype(ml_dtypes.bfloat16)
# dtypes both twins use, plus a few the format carries for other models.
DTYPE_POOL = [np.float32, np.float16, BF16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]


def random_bits(shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads, -0.0, denormals): only bit-exact IO keeps them."""
    dt = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    if dt == np.bool_:
        raw = raw & 1
    return raw.view(dt).reshape(shape)


tensor_dicts = st.dictionaries(
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
        lambda s: s != "__metadata__"),
    st.tuples(st.lists(st.integers(0, 5), max_size=3).map(tuple), st.sampled_from(DTYPE_POOL),
              st.integers(0, 2**16)),
    max_size=6,
).map(lambda d: {k: random_bits(shape, dt, seed) for k, (shape, dt, seed) in d.items()})


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
# One metadata key at most: the reference keeps metadata in a hash map, so with more its order varies.
@given(tensors=tensor_dicts, meta=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=1))
def test_writer_matches_reference_writer_and_reader_matches_reference_reader(tmp_path, tensors, meta):
    # The reference writes unreadable JSON (`{},"__metadata__":{}}`) for this one input; ours
    # writes `{"__metadata__":{}}`.
    assume(tensors or meta != {})
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    save_file(tensors, ours, meta)
    st_numpy.save_file(tensors, str(ref), metadata=meta)
    assert ours.read_bytes() == ref.read_bytes()
    theirs = st_numpy.load_file(str(ours))
    mine = load_file(ref)
    assert set(mine) == set(theirs) == set(tensors)
    for k in tensors:
        assert same_bits(mine[k], tensors[k]) and same_bits(theirs[k], tensors[k])
    with SafetensorsFile(ref) as f:
        assert f.metadata == (meta or {})


def test_get_is_a_read_only_zero_copy_view_and_release_keeps_data(tmp_path):
    t = {"w": random_bits((64, 1024), BF16, 1), "h": random_bits((3,), np.float16, 2)}
    save_file(t, tmp_path / "m.safetensors")
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        w = f.get("w")
        assert not w.flags.writeable and not w.flags.owndata
        f.release("w")  # pages dropped from the process; reading faults them back in
        assert same_bits(w, t["w"]) and same_bits(f.get("h"), t["h"])
        assert f.shape("w") == (64, 1024) and f.dtype("w") == BF16 and f.keys() == ["w", "h"]


def _resident_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_DONTNEED"), reason="no madvise on this platform")
def test_release_pages_drops_a_block_of_a_mapped_tensor_and_leaves_other_memory_alone(tmp_path):
    """What lets a loader hold one block of a tensor, not the tensor: the pages under a row block
    leave this process's RSS (and the data reads back the same), while an anonymous array or a
    strided view passed by mistake is left as it was."""
    t = {"w": random_bits((1024, 4096), np.float32, 3)}  # 16 MB
    save_file(t, tmp_path / "m.safetensors")
    with SafetensorsFile(tmp_path / "m.safetensors") as f:
        w = f.get("w")
        assert same_bits(w, t["w"])  # every page touched
        before = _resident_file_bytes()
        release_pages(w[:512])
        assert before - _resident_file_bytes() >= 7 << 20  # the 8 MB under the first 512 rows (less a page)
        release_pages(w[:, :10])  # strided: ignored
        assert same_bits(w, t["w"])
    anonymous = t["w"].copy()
    release_pages(anonymous)
    assert same_bits(anonymous, t["w"])


def test_writer_streams_in_any_order_and_checks_what_it_is_given(tmp_path):
    specs = [TensorSpec("a", (2, 3), np.dtype(np.float32)), TensorSpec("b", (4,), BF16)]
    a, b = random_bits((2, 3), np.float32, 0), random_bits((4,), BF16, 1)
    with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        with pytest.raises(SafetensorsFormatError, match="shape differs"):
            w.write("a", a.T)
        with pytest.raises(SafetensorsFormatError, match="dtype differs"):
            w.write("b", b.astype(np.float32))
        with pytest.raises(SafetensorsFormatError, match="not declared"):
            w.write("c", a)
        w.write("b", b)
        w.write("a", np.asfortranarray(a))  # non-contiguous input is written in row-major blocks
    out = st_numpy.load_file(str(tmp_path / "x.safetensors"))
    assert same_bits(out["a"], a) and same_bits(out["b"], b)


def test_writer_cast_only_when_asked(tmp_path):
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    with SafetensorsWriter(tmp_path / "c.safetensors", [TensorSpec("x", (4, 3), BF16)]) as w:
        w.write("x", x.T, cast=True)
    assert same_bits(load_file(tmp_path / "c.safetensors")["x"], x.T.astype(BF16))


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": np.ones(3, np.float32)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [TensorSpec("a", (3,), np.dtype(np.float32))]) as w:
            w.write("a", np.zeros(3, np.float32))
            raise RuntimeError("boom")
    with pytest.raises(SafetensorsFormatError, match="never written"):
        with SafetensorsWriter(path, [TensorSpec("a", (3,), np.dtype(np.float32))]):
            pass
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- malformed files ------------------------------------------------------------------------
def raw_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {
    "empty": (b"", TruncatedFileError, "too short"),
    "short length": (b"\x10\x00\x00", TruncatedFileError, "too short"),
    "header past end": (raw_file({"a": entry()}, b"\0" * 8, length=10_000), TruncatedFileError, "past the end"),
    "header above 100 MB": (raw_file(b"{}", length=MAX_HEADER_SIZE + 1), HeaderError, "100 MB"),
    "not json": (raw_file(b"{nope"), HeaderError, "not valid JSON"),
    "not utf-8": (raw_file(b'{"\xff":1}'), HeaderError, "not UTF-8"),
    "not an object": (raw_file(b"[1, 2]"), HeaderError, "not a JSON object"),
    "deep nesting": (raw_file(b"[" * 100_000), HeaderError, "not valid JSON"),
    "entry not an object": (raw_file({"a": 3}), HeaderError, "not an object"),
    "entry lacks fields": (raw_file({"a": {"dtype": "F32"}}), HeaderError, "lacks shape, data_offsets"),
    "unknown dtype": (raw_file({"a": entry(dtype="F31")}, b"\0" * 8), UnknownDtypeError, "unknown"),
    "sub-byte dtype": (raw_file({"a": entry(dtype="F4")}, b"\0" * 8), UnknownDtypeError, "unknown"),
    "negative dim": (raw_file({"a": entry(shape=(-2,))}, b"\0" * 8), HeaderError, "shape"),
    "bool dim": (raw_file({"a": entry(shape=(True,))}, b"\0" * 8), HeaderError, "shape"),
    "offsets not a pair": (raw_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8),
                           DataOffsetError, "pair"),
    "offsets past buffer": (raw_file({"a": entry(offsets=(0, 16))}, b"\0" * 8), DataOffsetError, "out of range"),
    "offsets reversed": (raw_file({"a": entry(offsets=(8, 0))}, b"\0" * 8), DataOffsetError, "out of range"),
    "size mismatch": (raw_file({"a": entry(shape=(3,))}, b"\0" * 8), DataOffsetError, "shape x dtype"),
    "overlap": (raw_file({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12), DataOffsetError, "overlaps"),
    "hole": (raw_file({"a": entry(offsets=(4, 12))}, b"\0" * 12), DataOffsetError, "hole"),
    "trailing bytes": (raw_file({"a": entry()}, b"\0" * 9), DataOffsetError, "no tensor owns"),
    "duplicate name": (raw_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
                       HeaderError, "twice"),
    "metadata not strings": (raw_file({"__metadata__": {"format": 1}}), HeaderError, "__metadata__"),
    "lone surrogate": (raw_file(b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8),
                       HeaderError, "Unicode"),
}


# The format forbids duplicate names, but the reference reader keeps the last one silently;
# we refuse, since which of two tensors is "the" weight is exactly what a reader must not guess.
REFERENCE_ACCEPTS = {"duplicate name"}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_file_gets_a_specific_error_naming_the_file(tmp_path, case):
    data, cls, words = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(cls, match=words) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and info.value.file == str(path)
    if case not in REFERENCE_ACCEPTS:
        with pytest.raises(Exception):  # the reference implementation refuses them too
            st_torch.load(data)


def test_error_names_tensor_expected_and_found(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_file({"w": entry(dtype="BF16", shape=(2, 3))}, b"\0" * 8))
    with pytest.raises(DataOffsetError) as info:
        SafetensorsFile(path)
    msg = str(info.value)
    assert "'w'" in msg and "expected 12 bytes for BF16[2, 3]" in msg and "found 8 bytes" in msg


def test_empty_scalar_zero_size_and_float8_tensors(tmp_path):
    t = {"s": np.array(1.5, np.float32), "z": np.zeros((0, 4), BF16),
         "f8": random_bits((3, 2), ml_dtypes.float8_e4m3fn, 5)}
    save_file(t, tmp_path / "a.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    out = load_file(tmp_path / "a.safetensors")
    assert all(same_bits(out[k], t[k]) for k in t)
    assert load_file(tmp_path / "empty.safetensors") == {}


# ---- fuzzing -------------------------------------------------------------------------------
def _valid_file() -> bytes:
    t = {"model.w": random_bits((3, 5), BF16, 0), "b": random_bits((4,), np.float32, 1),
         "i": random_bits((2,), np.int64, 2), "h": random_bits((3,), np.float16, 3)}
    return st_numpy.save(t, metadata={"format": "pt"})


VALID = _valid_file()
mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, val in ops:
        pos = min(pos, len(b))
        if op == "set" and pos < len(b):
            b[pos] = val
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = bytes([val])
        elif op == "delete" and pos < len(b):
            del b[pos]
    return bytes(b)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(mutation, min_size=1, max_size=4))
@example(ops=[("set", 0, 0xFF)])  # header length of ~255 bytes more than written
@example(ops=[("set", 7, 0x7F)])  # a header length in the exabytes
def test_fuzz_mutated_files_raise_only_documented_errors(tmp_path_factory, ops):
    data = mutate(VALID, ops)
    assume(data != VALID)
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(data)
    try:
        with SafetensorsFile(path) as f:
            ours = {k: np.array(f.get(k)) for k in f.keys()}
    except LOAD_ERRORS as e:
        assert str(path) in str(e)
        return
    # Whatever we accept, the reference reader accepts too, with the same bits (through torch:
    # the reference's numpy reader has no bfloat16).
    theirs = st_torch.load(data)
    assert set(theirs) == set(ours)
    for k in ours:
        t = theirs[k].contiguous().reshape(-1)
        assert tuple(theirs[k].shape) == ours[k].shape
        assert t.view(torch.uint8).numpy().tobytes() == ours[k].tobytes()


def test_dtype_table_covers_what_twins_use():
    for dt in (np.float32, np.float16, BF16, np.float64, np.int64, np.int32, np.bool_):
        assert np.dtype(dt) in DTYPES.values()


# ---- block copies --------------------------------------------------------------------------
@settings(max_examples=30)
@given(rows=st.integers(1, 70), cols=st.integers(1, 70), dtype=st.sampled_from([np.float32, BF16, np.float16]),
       to=st.sampled_from([None, np.float32, BF16]), transposed=st.booleans(), block=st.sampled_from([64, 1000, 1 << 20]),
       tiles=st.sampled_from([(160, 5, 2), (512 << 10, 512, 128)]), threads=st.sampled_from([1, 3]),
       offset=st.sampled_from([0, 1]))
def test_row_blocks_and_copy_into_equal_a_contiguous_copy(rows, cols, dtype, to, transposed, block, tiles, threads,
                                                         offset):
    import tempfile

    import weights.blockcopy as bc

    # `offset` 1: a view starting mid-word, as a bf16 tensor in a safetensors file may.
    a = random_bits((rows * cols + 1,), dtype, rows * cols)[offset:offset + rows * cols].reshape(rows, cols)
    a = np.where(np.isfinite(a.astype(np.float32)), a, 0).astype(dtype)  # casts of NaN payloads vary
    view = a.T if transposed else a
    target = np.dtype(to or dtype)
    want = np.ascontiguousarray(view, dtype=target).tobytes()
    saved = bc.BLOCK_BYTES, bc._TILE_BYTES, bc._TILE_ROWS, bc._STRIP, bc._PARALLEL_BYTES
    bc.BLOCK_BYTES, (bc._TILE_BYTES, bc._TILE_ROWS, bc._STRIP), bc._PARALLEL_BYTES = block, tiles, 0
    writer = bc.BlockWriter(threads)
    try:
        assert b"".join(b.tobytes() for b in bc.row_blocks(view, target)) == want
        assert b"".join(b.tobytes() for b in bc.row_blocks(view, target, bc.scratch())) == want
        assert bc.contiguous(view, target).tobytes() == want
        with tempfile.TemporaryFile() as f:  # the writer's threads, each band at its own offset
            f.write(b"head")
            writer.write(f.fileno(), 4, view, target)
            f.seek(0)
            assert f.read() == b"head" + want
            back = bytearray(len(want) + 3)  # read back, past the end of the file
            assert bc.pread_into(f.fileno(), back, 4) == len(want)
            assert bytes(back[:len(want)]) == want
    finally:
        writer.close()
        bc.BLOCK_BYTES, bc._TILE_BYTES, bc._TILE_ROWS, bc._STRIP, bc._PARALLEL_BYTES = saved


def test_copy_file_range_falls_back_to_reads_and_writes(tmp_path, monkeypatch):
    import os

    import weights.blockcopy as bc

    (tmp_path / "a").write_bytes(bytes(range(256)) * 10)
    for kernel in (True, False):
        if not kernel:
            monkeypatch.delattr(os, "copy_file_range", raising=False)
        with open(tmp_path / "a", "rb") as s, open(tmp_path / "b", "wb+") as d:
            bc.copy_file_range(s.fileno(), 100, d.fileno(), 7, 2000)
        assert (tmp_path / "b").read_bytes() == b"\0" * 7 + (bytes(range(256)) * 10)[100:2100]
