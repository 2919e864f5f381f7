import numpy as np
import pytest

from raysel.config import EmbedConfig
from raysel.embed import Embedder
from raysel.models import load_encoder


@pytest.fixture(scope="module")
def embedder():
    return Embedder(EmbedConfig(batch_size=4, max_tokens=16))


def test_embeddings_are_normalized_and_match_sentence_transformers(embedder):
    texts = ["A cat sat on the mat.", "Stock markets fell sharply today.", "x " * 40]
    out = embedder(
        {"text": np.array(texts + [""], dtype=object), "reason": np.array(["", "", "", "empty"], dtype=object)}
    )
    emb = out["embedding"]
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb[:3], axis=1), 1, rtol=1e-5)
    assert not emb[3].any()
    ref = load_encoder("minilm", max_tokens=16).encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(emb[:3], ref, atol=1e-5)
    assert out["embed_cut"].tolist() == [False, False, True, False]


def test_one_tokenization_matches_encode_at_every_length(embedder):
    """Texts from 1 to 30 words (the limit is 16 tokens: 14 words and 2 special tokens), in batches of 4."""
    words = "markets rallied as investors weighed the central bank's latest signals on rates and growth".split()
    texts = [" ".join((words * 3)[:n]) for n in range(1, 31)]
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    out = embedder({"text": np.array(texts, dtype=object), "reason": np.array([""] * len(texts), dtype=object)})
    encoder = load_encoder("minilm", max_tokens=16)
    ref = encoder.encode(texts, batch_size=4, normalize_embeddings=True)
    np.testing.assert_allclose(out["embedding"], ref, atol=1e-5)
    lengths = [len(ids) for ids in encoder.tokenizer(texts)["input_ids"]]
    assert out["embed_cut"].tolist() == [n > 16 for n in lengths]
    assert 0 < out["embed_cut"].sum() < len(texts)


def test_similar_texts_are_closer(embedder):
    texts = ["The football team won the match.", "The soccer side won the game.", "Interest rates rose again."]
    e = embedder({"text": np.array(texts, dtype=object), "reason": np.array(["", "", ""], dtype=object)})["embedding"]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
