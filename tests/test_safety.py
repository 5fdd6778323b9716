"""No code path unpickles or torch.loads data: weights load through safetensors only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNSAFE = re.compile(r"\b(pickle\.loads?|cPickle|torch\.load|marshal\.loads?|yaml\.load|dill\.loads?)\s*\(|"
                    r"\bimport\s+(pickle|dill|marshal)\b")


def test_no_unsafe_deserialisation_in_product_code() -> None:
    hits = []
    for package in ("schemas", "producers", "consumers", "streamer", "examples"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "unsafe deserialisation:\n" + "\n".join(hits)


def test_the_guard_catches_what_it_should() -> None:
    for bad in ("x = pickle.loads(data)", "torch.load(f)", "import pickle", "yaml.load(s)"):
        assert UNSAFE.search(bad), bad
    assert not UNSAFE.search("safetensors.torch.load_file(path)")
