"""llama.cpp's importance-matrix files (legacy .dat and imatrix GGUF): files written here byte by byte
from the documented layouts (llama.cpp's tools/imatrix) read as llama-quantize reads them, ours round
trip, and quantizing with either gives the very file the same weights in flashserve's format give."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from flashserve.errors import FlashserveError
from flashserve.quantization.gguf_export import GGUFQuantizeArgs, quantize_gguf
from flashserve.quantization.imatrix import load_imatrix, save_imatrix
from tests.model.tiny import hf_tiny, write_gguf

# the tiny Llama's linears and their columns (hidden 64, intermediate 96)
_COLS = {"attn_q": 64, "attn_k": 64, "attn_v": 64, "attn_output": 64, "ffn_gate": 64, "ffn_up": 64, "ffn_down": 96}


def _dat(entries: dict[str, tuple[int, np.ndarray]], trailer: tuple[int, str] | None = (7, "calib.txt")) -> bytes:
    """Legacy .dat: int32 count; per entry int32 name length, name, int32 ncall, int32 nval, float32
    values; then int32 chunk count, int32 dataset length, dataset."""
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer:
        out += struct.pack("<ii", trailer[0], len(trailer[1])) + trailer[1].encode()
    return out


def _gguf_str(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _gguf(tensors: dict[str, np.ndarray], general_type: str = "imatrix") -> bytes:
    """GGUF v3 (github.com/ggml-org/ggml/blob/master/docs/gguf.md): header, key/values, tensor infos
    (dims innermost first), data aligned to 32 bytes. Tensors are float32 numpy arrays (rows, ne0)."""
    kv = [("general.type", struct.pack("<I", 8) + _gguf_str(general_type)),
          ("imatrix.datasets", struct.pack("<IIQ", 9, 8, 1) + _gguf_str("calib.txt")),
          ("imatrix.chunk_count", struct.pack("<II", 4, 3)), ("imatrix.chunk_size", struct.pack("<II", 4, 512))]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    out += b"".join(_gguf_str(k) + v for k, v in kv)
    data, offsets = b"", []
    for a in tensors.values():
        offsets.append(len(data))
        data += a.astype("<f4").tobytes()
        data += b"\0" * (-len(data) % 32)
    for (name, a), off in zip(tensors.items(), offsets):
        ne = a.shape[::-1]
        out += _gguf_str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", 0, off)  # type F32
    return out + b"\0" * (-len(out) % 32) + data


def _means(seed: int = 0) -> dict[str, np.ndarray]:
    """Heavy-tailed mean squared inputs for every linear of the tiny model and its head."""
    g = np.random.default_rng(seed)
    means = {f"blk.{i}.{n}.weight": g.gamma(0.3, 1.0, k).astype(np.float32) for i in range(2) for n, k in _COLS.items()}
    means["output.weight"] = g.gamma(0.3, 1.0, 64).astype(np.float32)
    return means


def test_llama_files_read_as_llama_quantize_reads_them(tmp_path):
    """.dat values / ncall and GGUF in_sum2 / counts, both in float32; a count of 0 weighs 1 (GGUF)
    or leaves the values as they are (.dat)."""
    g = np.random.default_rng(1)
    a, b = (g.random(64, np.float32) * 40, g.random(96, np.float32) * 40)
    dat = tmp_path / "legacy.bin"  # told apart by content, not by name
    dat.write_bytes(_dat({"blk.0.attn_q.weight": (3, a), "blk.1.ffn_down.weight": (0, b)}))
    got = load_imatrix(str(dat))
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], a / np.float32(3))
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight"], b)
    dat.write_bytes(_dat({"blk.0.attn_q.weight": (3, a)}, trailer=None))  # the trailer is optional
    np.testing.assert_array_equal(load_imatrix(str(dat))["blk.0.attn_q.weight"], a / np.float32(3))

    gg = tmp_path / "imatrix.dat"
    gg.write_bytes(_gguf({"blk.0.attn_q.weight.in_sum2": a[None], "blk.0.attn_q.weight.counts": np.full((1, 1), 1536),
                          "blk.0.attn_q.weight.in_sum": a[None] / 10,  # newer files' plain sums: not a weight
                          "blk.1.ffn_down.weight.in_sum2": b[None], "blk.1.ffn_down.weight.counts": np.zeros((1, 1))}))
    got = load_imatrix(str(gg))
    assert sorted(got) == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    np.testing.assert_array_equal(got["blk.0.attn_q.weight"], a / np.float32(1536))
    np.testing.assert_array_equal(got["blk.1.ffn_down.weight"], np.ones(96, np.float32))


@pytest.mark.parametrize("suffix", [".gguf", ".dat", ".imatrix"])
def test_round_trip(tmp_path, suffix):
    """Ours written in each format reads back as written; llama.cpp's files carry its sums, counts and
    metadata (GGUF) or values times ncall, ncall = chunks rounded up (.dat)."""
    means, tokens, chunk = _means(), 1000, 512
    path = tmp_path / f"m{suffix}"
    save_imatrix(str(path), means, tokens, "/some/where/calib.txt", chunk_size=chunk)
    got = load_imatrix(str(path))
    assert sorted(got) == sorted(means)
    for k, v in means.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
    if suffix == ".gguf":
        r = GGUFReader(str(path))
        assert r.fields["general.type"].contents() == "imatrix" and "general.architecture" not in r.fields
        assert r.fields["imatrix.datasets"].contents() == ["calib.txt"]
        assert (r.fields["imatrix.chunk_count"].contents(), r.fields["imatrix.chunk_size"].contents()) == (1, 512)
        t = {x.name: x for x in r.tensors}
        assert list(t["blk.1.ffn_down.weight.in_sum2"].shape) == [96, 1]  # ne: (columns, matrices)
        assert t["blk.1.ffn_down.weight.counts"].data.tolist() == [[1000.0]]
        np.testing.assert_allclose(t["blk.1.ffn_down.weight.in_sum2"].data[0], means["blk.1.ffn_down.weight"] * 1000,
                                   rtol=1e-6)
    if suffix == ".dat":
        raw = path.read_bytes()
        assert struct.unpack_from("<i", raw)[0] == len(means)
        name = sorted(means)[0]  # entries in name order
        assert raw[8 : 8 + len(name)] == name.encode()
        ncall, nval = struct.unpack_from("<ii", raw, 8 + len(name))
        assert (ncall, nval) == (math.ceil(tokens / chunk), means[name].size)
        assert raw.endswith(struct.pack("<ii", 1, 9) + b"calib.txt")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(hf_tiny("llama", seed=5), tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_quantizing_with_llama_files_gives_the_same_file(tiny_gguf, tmp_path):
    """A .dat and an imatrix GGUF written here, and flashserve's safetensors holding the weights
    llama-quantize takes from them, quantize to byte-identical files, which differ from one quantized
    without an importance matrix."""
    sums = {"m.dat": {k: v * 3 for k, v in _means(2).items()}, "m.gguf": {k: v * 1536 for k, v in _means(3).items()}}
    (tmp_path / "m.dat").write_bytes(_dat({k: (3, v) for k, v in sums["m.dat"].items()}))
    (tmp_path / "m.gguf").write_bytes(_gguf({f"{k}.{part}": (v[None] if part == "in_sum2" else np.full((1, 1), 1536.0))
                                             for k, v in sums["m.gguf"].items() for part in ("in_sum2", "counts")}))
    for name, count in (("m.dat", 3), ("m.gguf", 1536)):
        save_imatrix(str(tmp_path / f"{name}.imatrix"), {k: v / np.float32(count) for k, v in sums[name].items()}, 1,
                     "x")
    files = {}
    for imatrix in ("m.dat", "m.gguf", "m.dat.imatrix", "m.gguf.imatrix", None):
        out = tmp_path / f"q-{imatrix}.gguf"
        summary = quantize_gguf(GGUFQuantizeArgs(model=str(tiny_gguf), out=str(out), qtype="Q4_K",
                                                 output_type="Q5_K", imatrix=imatrix and str(tmp_path / imatrix)))
        assert summary["notes"] == []
        files[imatrix] = out.read_bytes()
    assert files["m.dat"] == files["m.dat.imatrix"] and files["m.gguf"] == files["m.gguf.imatrix"]
    assert files["m.dat"] != files[None] and files["m.gguf"] != files[None] and files["m.dat"] != files["m.gguf"]


def test_bad_files(tiny_gguf, tmp_path):
    def fails(data: bytes, match: str, quantize: bool = False):
        path = tmp_path / "bad"
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        with pytest.raises(FlashserveError, match=match):
            if quantize:
                quantize_gguf(GGUFQuantizeArgs(model=str(tiny_gguf), out=str(tmp_path / "q.gguf"), imatrix=str(path)))
            else:
                load_imatrix(str(path))

    a = np.ones(64, np.float32)
    good = _dat({"blk.0.attn_q.weight": (1, a)})
    fails(good[:-20], r"not llama.cpp's legacy .dat either \(truncated legacy .dat")
    fails(good + b"xyz", "unexpected bytes after")
    fails(b"The licence says that you may copy", "no GGUF or safetensors header")
    sums = _gguf({"blk.0.attn_q.weight.in_sum2": a[None], "blk.0.attn_q.weight.counts": np.ones((1, 1))})
    fails(sums[:-100], "unreadable GGUF")
    fails(_gguf({"blk.0.attn_q.weight.in_sum2": a[None]}), "in_sum2 has no .counts")
    fails(_gguf({"blk.0.ffn_up.weight.in_sum2": np.ones((4, 64)), "blk.0.ffn_up.weight.counts": np.ones((4, 1))}),
          "4 expert matrices")
    fails(tiny_gguf.read_bytes(), "no <weight>.in_sum2 tensors .no general.type.: a model")
    fails(_dat({"blk.9.attn_q.weight": (1, a), "blk.0.attn_q.weight": (1, a)}),
          "1 of the importance matrix's 2 weights are not tensors of the model .blk.9.attn_q.weight.", quantize=True)
    fails(_dat({"blk.0.attn_q.weight": (1, np.ones(128, np.float32))}),
          "128 columns for blk.0.attn_q.weight, whose rows hold 64 weights: it was computed for another model, or 2 "
          "experts' columns", quantize=True)
    assert not (tmp_path / "q.gguf").exists()
