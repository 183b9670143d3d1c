"""Our GGUF header reader against the gguf package's GGUFReader (an independent implementation of
the same spec): every metadata value, every tensor's type, shape, offset and bytes."""
from __future__ import annotations

import numpy as np
import pytest

from flashserve.errors import ModelFormatError
from flashserve.model.loader.gguf_file import _read, open_gguf


def assert_same_as_gguf_reader(path: str) -> None:
    from gguf import GGUFReader

    ours = _read(path)  # uncached: each call parses the file
    ref = GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(want)
    for key, value in want.items():
        got = ours.metadata[key]
        if isinstance(value, float):  # gguf widens float32 scalars to Python floats the same way
            assert np.float32(got) == np.float32(value), key
        else:
            assert got == value and type(got) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist()), a.name
        assert (a.n_elements, a.data_offset, a.n_bytes) == (int(b.n_elements), int(b.data_offset), int(b.n_bytes)), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


def write_every_value_type(path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 7)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve — ünïcödé 🤗")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.strs", ["a", "", "é🤗"])
    w.add_array("t.bools", [True, False])
    w.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b.weight", np.arange(64, dtype=np.float16).reshape(2, 32))
    q = gguf.quants.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64), gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_every_value_type_and_tensor_kind(tmp_path):
    path = tmp_path / "all.gguf"
    write_every_value_type(path)
    assert_same_as_gguf_reader(str(path))
    md = _read(str(path)).metadata
    assert md["t.u64"] == 2**63 + 7 and md["t.strs"] == ["a", "", "é🤗"] and md["t.bool"] is True


def test_a_cut_anywhere_in_the_header_is_a_clear_error(tmp_path):
    path = tmp_path / "all.gguf"
    write_every_value_type(path)
    data = path.read_bytes()
    header_end = min(t.data_offset for t in _read(str(path)).tensors)
    for cut in range(5, header_end + 40, 7):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match="truncated|corrupted"):
            open_gguf(str(p))


@pytest.mark.slow
def test_real_model_headers(smollm2_gguf):
    assert_same_as_gguf_reader(smollm2_gguf)
