"""The tokenizer cache (tokenizer/cache.py) against a fresh build from the GGUF metadata: the same
ids as transformers' own tokenizer for the file and the same special tokens as an uncached build;
rebuilt when the model file changes, even in place with its mtime put back; a corrupt entry is
never used and gets rewritten."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flashserve.tokenizer import cache
from flashserve.tokenizer.tokenizer import Tokenizer
from tests.tokenizer.test_tokenizer import TEXTS

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch, tmp_path):
    """A cache directory of this test's own (the session's model fixtures are resolved before)."""
    monkeypatch.setenv("FLASHSERVE_CACHE", str(tmp_path / "cache"))


def fresh_build(path) -> object:
    """transformers' tokenizer for the file, built now: the reference for ids and text."""
    from transformers import AutoTokenizer

    p = Path(path)
    return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


@pytest.fixture(scope="module")
def smollm2_spec(smollm2_gguf):
    """Special tokens and chat template of an uncached build."""
    return Tokenizer.build(smollm2_gguf).spec


def assert_same_as(ours: Tokenizer, hf, spec) -> None:
    assert ours.spec == spec
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.bos_token_id == hf.bos_token_id
    if ours.chat_template:
        assert ours.apply_chat_template(CONVERSATION) == hf.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True)


def load_from_cache(path) -> Tokenizer:
    """The tokenizer read back from the entry alone (None-safe: fails if there is none)."""
    hit = cache.load(Path(path))
    assert hit is not None, "no usable cache entry"
    from tokenizers import Tokenizer as Backend

    from flashserve.tokenizer.tokenizer import TokenizerSpec

    return Tokenizer(Backend.from_str(hit[1]), TokenizerSpec.from_json(hit[0]))


def test_cached_tokenizer_equals_a_fresh_build(smollm2_gguf, hf_smollm2_tokenizer, smollm2_spec):
    assert cache.load(Path(smollm2_gguf)) is None
    built = Tokenizer.from_model_path(smollm2_gguf)  # a miss: builds and writes the entry
    cached = load_from_cache(smollm2_gguf)
    assert cached.spec == built.spec
    assert_same_as(cached, hf_smollm2_tokenizer, smollm2_spec)
    assert_same_as(Tokenizer.from_model_path(smollm2_gguf), hf_smollm2_tokenizer, smollm2_spec)


@pytest.mark.slow
def test_cached_gemma3_tokenizer_equals_a_fresh_build(gemma3_gguf, hf_gemma3_tokenizer):
    Tokenizer.from_model_path(gemma3_gguf)
    spec = Tokenizer.build(gemma3_gguf).spec
    assert_same_as(load_from_cache(gemma3_gguf), hf_gemma3_tokenizer, spec)
    assert_same_as(Tokenizer.from_model_path(gemma3_gguf), hf_gemma3_tokenizer, spec)


def test_merges_with_a_space_keep_their_pair_form(tmp_path, monkeypatch):
    """The entry writes a BPE's merges as "left right" strings only when that split is unambiguous: a
    merge whose token holds a space stays a pair, and the stored tokenizer still merges it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    vocab = {"x": 0, " ": 1, "y": 2, " y": 3, "x y": 4}
    backend = Backend(BPE(vocab, [(" ", "y"), ("x", " y")]))
    assert backend.encode("x y").ids == [4]
    model = tmp_path / "m.gguf"
    model.write_bytes(b"not parsed here")
    monkeypatch.setattr(cache, "_header_digest", lambda _: "a header")
    cache.store(model, {}, backend.to_str())
    assert Backend.from_str(cache.load(model)[1]).encode("x y").ids == [4]


def test_entries_of_models_that_are_gone_are_removed(tmp_path, monkeypatch):
    """Writing an entry removes those whose model file no longer exists, and only those."""
    monkeypatch.setattr(cache, "_header_digest", lambda _: "a header")
    gone, kept, new = (tmp_path / f"{name}.gguf" for name in ("gone", "kept", "new"))
    for model in (gone, kept, new):
        model.write_bytes(b"not parsed here")
    for model in (gone, kept):
        cache.store(model, {}, "{}")
    assert cache.entry_path(gone).exists()
    gone.unlink()
    cache.store(new, {}, "{}")
    assert not cache.entry_path(gone).exists()
    assert cache.load(kept) is not None and cache.load(new) is not None


def _set_add_bos(path: Path, value: bool) -> None:
    """Rewrite the bool tokenizer.ggml.add_bos_token in place: same size, and the mtime put back,
    so only the header digest can tell the files apart."""
    st = path.stat()
    key = b"tokenizer.ggml.add_bos_token"
    with path.open("r+b") as f:
        head = f.read(4 << 20)
        at = head.index(key) + len(key)
        assert head[at:at + 4] == (7).to_bytes(4, "little"), "expected a bool value"  # GGUF type 7 = bool
        f.seek(at + 4)
        f.write(bytes([value]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rebuilt_when_the_model_file_changes(smollm2_gguf, tmp_path):
    model = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_gguf, model)
    before = Tokenizer.from_model_path(str(model))
    assert before.encode("hi")[0] != before.bos_token_id  # SmolLM2 adds no BOS
    size, mtime = model.stat().st_size, model.stat().st_mtime_ns

    _set_add_bos(model, True)
    assert (model.stat().st_size, model.stat().st_mtime_ns) == (size, mtime)
    assert cache.load(model) is None  # the entry no longer matches the file
    after = Tokenizer.from_model_path(str(model))
    reference = fresh_build(model)
    assert reference("hi")["input_ids"][0] == reference.bos_token_id  # the change matters
    spec = Tokenizer.build(model).spec
    assert_same_as(after, reference, spec)
    assert_same_as(load_from_cache(model), reference, spec)  # and the entry was rewritten

    os.utime(model, ns=(mtime + 10**9, mtime + 10**9))  # touched: a new mtime is a new file
    assert cache.load(model) is None


def _garbage(entry: Path) -> None:
    entry.write_bytes(b"\x00\xffnot a cache entry")


def _truncated(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def _flipped_byte(entry: Path) -> None:
    raw = bytearray(entry.read_bytes())
    raw[-100] ^= 0x20  # inside the backend JSON: the digest no longer matches
    entry.write_bytes(bytes(raw))


def _valid_digest_bad_content(entry: Path) -> None:
    """A well-formed entry for the right file whose tokenizer JSON does not load."""
    import hashlib
    import json

    header = json.loads(entry.read_bytes().partition(b"\n")[0])
    body = b'{"version": "1.0", "model": null}'
    header["digest"] = hashlib.sha256(body).hexdigest()
    entry.write_bytes(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _flipped_byte, _valid_digest_bad_content])
def test_corrupt_entry_is_ignored_and_rewritten(smollm2_gguf, hf_smollm2_tokenizer, smollm2_spec, corrupt):
    Tokenizer.from_model_path(smollm2_gguf)
    entry = cache.entry_path(Path(smollm2_gguf))
    good = entry.read_bytes()
    corrupt(entry)
    assert entry.read_bytes() != good
    assert_same_as(Tokenizer.from_model_path(smollm2_gguf), hf_smollm2_tokenizer, smollm2_spec)
    assert entry.read_bytes() == good  # rewritten with what a fresh build gives
