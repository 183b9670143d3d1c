"""Writes llamacpp_ids.json: llama.cpp's own token ids for the test texts on each catalogue model,
the reference that tests/tokenizer/test_tokenizer.py compares with when llama-cpp-python is not
installed (CI). Run from the repository root with the peer installed (`make bench` installs it):

    python -m tests.tokenizer.make_llamacpp_ids
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from tests.tokenizer.test_tokenizer import LLAMACPP_MODELS, TEXTS

OUT = Path(__file__).with_name("llamacpp_ids.json")


def main() -> None:
    import llama_cpp

    from flashserve.model.catalogue import fetch

    ids = {}
    for name in LLAMACPP_MODELS:
        ref = llama_cpp.Llama(model_path=str(fetch(name)), vocab_only=True, verbose=False)
        ids[name] = {text: ref.tokenize(text.encode(), add_bos=False, special=True) for text in TEXTS[1:]}
    made_by = f"python -m tests.tokenizer.make_llamacpp_ids, llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
    lines = ["{", f'"made_by": {json.dumps(made_by)},', '"ids": {']
    for m, (name, per_text) in enumerate(ids.items()):  # one text per line, so a diff shows which changed
        lines.append(f"{json.dumps(name)}: {{")
        lines += [f"  {json.dumps(t, ensure_ascii=False)}: {json.dumps(v)}" + ("," if i < len(per_text) - 1 else "")
                  for i, (t, v) in enumerate(per_text.items())]
        lines.append("}" + ("," if m < len(ids) - 1 else ""))
    lines += ["}", "}"]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
