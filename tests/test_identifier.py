"""The identifier ranking: pure math on a hand-made vocabulary, then the real CLIP vocabulary."""

import re
import string
import time

import pytest

from dreambooth.cli import main
from dreambooth.identifier import (
    KNOWN_MEANINGS,
    POOL,
    check_token,
    pick_token,
    rank_tokens,
    single_token,
    text_encoder_similarity,
    top_candidates,
    vocabulary,
)
from dreambooth.tokenizer import clip_tokenizer, clip_vocab

SKS_WARNING = "sks is a rifle brand (SKS); models draw guns"


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


# ------------------------------------------------------------------ a hand-made vocabulary

MERGES = [
    ("d", "o"), ("do", "g</w>"),  # dog: merged first, a common word
    ("k", "a"), ("ka", "l</w>"),  # kal
    ("z", "o"), ("zo", "m</w>"), ("m", "s</w>"), ("zo", "ms</w>"),  # zom, but "zoms" exists: a real word
    ("m", "i"), ("mi", "x</w>"),  # mix
    ("s", "k"), ("sk", "s</w>"),  # sks: known meaning
    ("r", "c"), ("rc", "n</w>"),  # rcn: no vowel
    ("b", "e"), ("be", "l</w>"),  # bel
    ("l", "u"), ("lu", "p</w>"),  # lup: the latest, rarest candidate
    ("a", "m</w>"), ("t", "a"), ("ta", "m</w>"),  # tam: BPE never reaches it (t + am</w>)
]


def small_vocab():
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + [a + b for a, b in MERGES]
    return {t: i for i, t in enumerate(tokens)}, MERGES


def test_rank_small_vocab_exact_order():
    vocab, merges = small_vocab()
    picks = rank_tokens(vocab, merges, count=10, common=3)
    assert [c.token for c in picks] == ["lup", "bel", "mix", "kal"]
    assert [c.rank for c in picks] == [1, 2, 3, 4]
    assert picks[0].id == vocab["lup</w>"] and picks[0].merge_rank == MERGES.index(("lu", "p</w>"))
    assert all(c.te_similarity is None and c.reason for c in picks)
    assert [c.token for c in rank_tokens(vocab, merges, count=2, common=3)] == ["lup", "bel"]


def test_te_similarity_reranks_toward_far_tokens():
    vocab, merges = small_vocab()
    ids = {w: vocab[w + "</w>"] for w in ("lup", "bel", "mix", "kal")}
    sims = {ids["lup"]: 0.9, ids["bel"]: 0.1, ids["mix"]: 0.5, ids["kal"]: 0.1}
    nearest = {i: "dog" for i in ids.values()}
    picks = rank_tokens(vocab, merges, count=4, te_similarity=sims, te_nearest=nearest, common=3)
    # lowest similarity first; bel and kal tie and keep vocabulary order (bel is rarer)
    assert [c.token for c in picks] == ["bel", "kal", "mix", "lup"]
    assert picks[0].te_similarity == 0.1 and picks[0].nearest_word == "dog"
    # only the first `pool` vocabulary candidates are re-ranked; the rest follow in vocabulary order
    picks = rank_tokens(vocab, merges, count=4, te_similarity=sims, pool=2, common=3)
    assert [c.token for c in picks] == ["bel", "lup", "mix", "kal"]


def test_accept_drops_and_refills():
    vocab, merges = small_vocab()
    picks = rank_tokens(vocab, merges, count=2, accept=lambda w, i: w != "bel", common=3)
    assert [c.token for c in picks] == ["lup", "mix"]


# ------------------------------------------------------------------ the real CLIP vocabulary


def test_picks_are_single_tokens(tokenizer):
    picks = top_candidates(tokenizer, count=20)
    assert len(picks) == 20
    for c in picks:
        assert tokenizer(c.token).input_ids == [49406, c.id, 49407]
        prompt = tokenizer(f"a photo of {c.token} dog").input_ids
        assert prompt == [49406, 320, 1125, 539, c.id, 1929, 49407]
        assert single_token(tokenizer, c.token, c.id)
    # the vocabulary-only path (own BPE on the same merges) agrees with the tokenizer
    assert [c.token for c in top_candidates(None, count=20)] == [c.token for c in picks]


def test_deterministic_and_fast():
    vocab, merges = clip_vocab()
    assert rank_tokens(vocab, merges, 50) == rank_tokens(vocab, merges, 50)
    clip_vocab.cache_clear()
    start = time.perf_counter()
    first = pick_token()
    assert time.perf_counter() - start < 1.0
    assert pick_token() == first
    assert re.fullmatch("[a-z]{3,5}", first)


def test_exclusions():
    vocab, merges = vocabulary()
    picked = {c.token for c in rank_tokens(vocab, merges, 3000)}
    for word in ("dog", "the", "photo", "cat", "sks", "hover", "hertz", "kilt"):
        assert word not in picked
    assert not picked & set(KNOWN_MEANINGS)
    assert all(w.isascii() and w.isalpha() and 3 <= len(w) <= 5 for w in picked)


def test_check_token(tokenizer):
    assert SKS_WARNING in check_token("sks", tokenizer)
    assert any("common word" in p for p in check_token("dog", tokenizer))
    assert any("common word" in p for p in check_token("the", tokenizer))
    assert any("tokens" in p for p in check_token("zx9q", tokenizer))  # several tokens
    assert any("real word" in p for p in check_token("hover", tokenizer))
    assert check_token(pick_token(tokenizer), tokenizer) == []


def test_text_encoder_signal(tokenizer):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=1, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    vocab_only = top_candidates(tokenizer, count=POOL)
    ids = [c.id for c in vocab_only[:5]]
    signal = text_encoder_similarity(tokenizer, te, ids, [1929, 2368, 1125])  # dog, cat, photo
    assert set(signal.similarity) == set(ids)
    assert all(-1.0 <= s <= 1.0 for s in signal.similarity.values())
    assert set(signal.nearest.values()) <= {"dog", "cat", "photo"}

    start = time.perf_counter()
    picks = top_candidates(tokenizer, te, count=5)
    assert time.perf_counter() - start < 30
    assert [c.token for c in picks] == [c.token for c in top_candidates(tokenizer, te, count=5)]
    sims = [c.te_similarity for c in picks]
    assert sims == sorted(sims)
    assert {c.token for c in picks} <= {c.token for c in vocab_only}
    assert pick_token(tokenizer, te) == picks[0].token


# ------------------------------------------------------------------ the command


def test_cli_lists_rows(capsys):
    assert main(["tokens", "--count", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+[a-z]+\s+\d+\s+\d+\s", line)]
    assert len(rows) == 5
    assert rows[0].split()[1] == pick_token()
    assert SKS_WARNING in out


def test_cli_check(capsys):
    assert main(["tokens", "--check", "sks"]) == 1
    assert SKS_WARNING in capsys.readouterr().out
    assert main(["tokens", "--check", pick_token()]) == 0
    assert "looks fine: rank 1" in capsys.readouterr().out
