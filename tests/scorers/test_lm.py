import numpy as np
import pytest
import torch

from raysel.config import ScorerConfig
from raysel.scorers.lm import CausalLMScorer, token_stats


def _reference(logits, ids, mask):
    """Slow reference: a Python loop over sequences and positions, NumPy softmax."""
    out = []
    for b in range(logits.shape[0]):
        ents, nlls = [], []
        for t in range(logits.shape[1] - 1):
            if mask[b, t + 1] == 0:
                continue
            z = logits[b, t].astype(np.float64)
            p = np.exp(z - z.max())
            p /= p.sum()
            ents.append(-(p * np.log(p)).sum())
            nlls.append(-np.log(p[ids[b, t + 1]]))
        out.append((np.mean(ents) if ents else np.nan, np.mean(nlls) if nlls else np.nan, len(nlls)))
    return out


def test_token_stats_match_a_slow_reference_with_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 3
    ids = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    ent, nll, n = token_stats(logits, ids, mask)
    ref = _reference(logits.numpy(), ids.numpy(), mask.numpy())
    for b, (re, rn, rc) in enumerate(ref):
        assert n[b].item() == rc
        if rc == 0:
            assert torch.isnan(ent[b]) and torch.isnan(nll[b])
        else:
            assert ent[b].item() == pytest.approx(re, rel=1e-5)
            assert nll[b].item() == pytest.approx(rn, rel=1e-5)


def test_uniform_logits_have_entropy_log_v():
    ent, nll, _ = token_stats(torch.zeros(1, 4, 50), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))
    assert ent.item() == pytest.approx(np.log(50), rel=1e-6)
    assert nll.item() == pytest.approx(np.log(50), rel=1e-6)


@pytest.fixture(scope="module")
def scorer():
    return CausalLMScorer(ScorerConfig(name="loss", max_tokens=24, batch_size=4), outputs=("entropy", "loss"))


def test_real_model_prefers_grammatical_text(scorer):
    good = "The children walked to school in the morning and met their friends at the gate."
    words = good.split()
    shuffled = " ".join(words[i] for i in np.random.default_rng(0).permutation(len(words)))
    batch = {
        "text": np.array([good, shuffled, ""], dtype=object),
        "reason": np.array(["", "", "empty text"], dtype=object),
    }
    out = scorer(batch)
    assert out["loss"][0] < out["loss"][1] - 1.0  # measured: ~3.3 vs ~8.7 on longer texts
    assert np.isnan(out["loss"][2]) and np.isnan(out["entropy"][2]) and out["lm_tokens"][2] == 0
    assert batch["text"][0] == good  # the input batch is not modified


def test_truncation_is_flagged_and_batching_does_not_change_scores(scorer):
    long = "word " * 200
    texts = ["Short text.", long, "A medium sized sentence about the weather today."]
    out = scorer({"text": np.array(texts, dtype=object), "reason": np.array(["", "", ""], dtype=object)})
    assert out["lm_cut"].tolist() == [False, True, False]
    assert out["lm_tokens"][1] == 23  # max_tokens 24 includes the BOS token; 23 text tokens are predicted
    alone = scorer({"text": np.array(texts[2:], dtype=object), "reason": np.array([""], dtype=object)})
    assert alone["loss"][0] == pytest.approx(out["loss"][2], rel=1e-4)


def _old_token_stats(logits, input_ids, attention_mask):
    """The implementation before chunking (kept as the reference): whole-batch float32 log-softmax [B, T, V]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logp.dtype)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    sq = (p * p).sum(-1) - 2 * p.gather(-1, target.unsqueeze(-1)).squeeze(-1) + 1
    n = mask.sum(-1)
    denom = n.clamp(min=1)
    nan = torch.full_like(denom, float("nan"))

    def mean(v):
        return torch.where(n > 0, (v * mask).sum(-1) / denom, nan)

    return mean(entropy), mean(nll), mean(sq.clamp(min=0).sqrt()), n.long()


@pytest.fixture(scope="module")
def tiny_llama():
    """A random 2-block Llama with a 3,000-token vocabulary (untied head, so the head is not the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=3000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 3 * 3000 * 2, 2**30])  # one position, two, the whole batch
def test_chunked_lm_stats_equal_the_whole_batch_formula_with_padding(tiny_llama, chunk_bytes):
    from raysel.scorers.lm import lm_stats

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 3000, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] + [0] * 8])
    with torch.inference_mode():
        got = lm_stats(tiny_llama, ids, mask, el2n=True, chunk_bytes=chunk_bytes)
        logits = tiny_llama(input_ids=ids, attention_mask=mask).logits
    ref_ent, ref_nll, ref_el2n, ref_n = _old_token_stats(logits, ids, mask)
    assert got.tokens.tolist() == ref_n.tolist() == [8, 4, 0]
    for value, ref in ((got.entropy, ref_ent), (got.nll, ref_nll), (got.el2n, ref_el2n)):
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got.nll[2]) and got.nll[0] > 7.0  # ~log 3000 = 8.0 under a random model
    # padding does not reach a real token's statistics: the short rows alone score the same
    with torch.inference_mode():
        alone = lm_stats(tiny_llama, ids[1:2, :5], mask[1:2, :5], chunk_bytes=chunk_bytes)
    torch.testing.assert_close(alone.nll[0], got.nll[1], rtol=1e-5, atol=1e-6)


def test_token_stats_on_given_logits_are_chunk_independent():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, 50, generator=g) * 4
    ids = torch.randint(0, 50, (4, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 6 + [0], [1] * 2 + [0] * 5])
    ref_ent, ref_nll, _, ref_n = _old_token_stats(logits, ids, mask)
    for chunk_bytes in (1, 4 * 4 * 50 * 3, 2**30):
        ent, nll, n = token_stats(logits, ids, mask, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)
        assert n.tolist() == ref_n.tolist()
