"""Pick the rare identifier token that DreamBooth binds the subject to ("a photo of [V] dog").

The criterion (docs/identifier.md has the long form and the table it produces):

1. Rarity from the vocabulary. CLIP's BPE learned its merges most-frequent-first, so the merge
   that created a token says how common it was in CLIP's training text: a later merge is a rarer
   token. Candidates are ranked by merge rank, latest first (ties, which only the text-encoder
   signal can create, go to the lower token id).
2. Shape. A candidate is a whole word (its BPE token ends in ``</w>``, so it stands alone in a
   prompt), 3-5 ASCII letters, pronounceable-ish (see ``shape_problem``), and encodes to exactly
   one token both alone and inside "a photo of TOKEN dog".
3. No known meaning. Tokens from the first ``COMMON_MERGES`` merges are common words. A token
   whose inflections are also whole words in the vocabulary ("hover" -> "hovering") is a real
   word. ``KNOWN_MEANINGS`` is a small hand-written blocklist for what the vocabulary cannot tell
   (brands, names, acronyms, slurs, and "sks", the token the DreamBooth guides made popular,
   which is a rifle).
4. Optionally, a text-encoder signal: for each of the top ``pool`` candidates, the cosine
   similarity of the text encoder's output at the token in "a photo of a TOKEN" to the same for
   the most similar of ``N_COMMON`` common words (centered on the common words' mean). The
   pool is re-ranked by that similarity, lowest first: far from every ordinary word.

``rank_tokens`` is the pure ranking; ``text_encoder_similarity`` computes step 4's numbers;
``pick_token`` and ``check_token`` are what the trainer and the CLI call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

END = "</w>"
COMMON_MERGES = 10_000  # tokens merged before this are treated as common words
MIN_LEN, MAX_LEN = 3, 5
POOL = 300  # how many vocabulary candidates the text-encoder signal re-ranks
N_COMMON = 2_000  # how many common words the text-encoder signal compares against
TEMPLATE = "a photo of a"  # the text encoder reads the token at the end of this
PROMPT_CHECK = "a photo of {} dog"  # a candidate must stay one token inside this prompt
VOWELS = set("aeiou")
INFLECTIONS = ("s", "es", "ed", "d", "ing", "er", "ers", "ly", "y")

# Tokens whose meaning the vocabulary cannot reveal. Curated by reading the top of the
# vocabulary-only ranking for the CLIP vocabulary (and the usual suspects from DreamBooth guides);
# it is not exhaustive, which is why `dreambooth tokens --check` exists. Each value completes
# the sentence "TOKEN is ...".
KNOWN_MEANINGS: dict[str, str] = {
    # the DreamBooth-guide classics
    "sks": "a rifle brand (SKS); models draw guns",
    "ohwx": "a token so widely used in published DreamBooth/LoRA fine-tunes that it may carry their subjects",
    "zwx": "a token widely used in published DreamBooth fine-tunes",
    # brands, media, organisations
    "hertz": "a car-rental brand and a unit of frequency",
    "foxtv": "a TV network (Fox TV)",
    "vimeo": "a video site",
    "ruger": "a firearms brand",
    "glock": "a firearms brand",
    "nasa": "the space agency",
    "lego": "a toy brand",
    "ikea": "a furniture brand",
    "nike": "a sportswear brand",
    # famous people and characters (a name brings a face)
    "mesut": "a famous footballer's first name (Mesut Ozil)",
    "halep": "a famous tennis player (Simona Halep)",
    "isner": "a famous tennis player (John Isner)",
    "linus": "a famous first name (Linus Torvalds, Peanuts' Linus)",
    "cudi": "a rapper (Kid Cudi)",
    "rizzo": "a surname of several public figures and a Muppet",
    "eames": "a furniture designer (Eames chairs)",
    "mako": "a shark species",
    "tux": "the Linux penguin and a tuxedo",
    # slurs and profanity
    "jap": "an ethnic slur",
    "fck": "profanity",
    "nips": "a slur and slang for nipples",
    "porn": "sexual content",
    "nsfw": "sexual content",
    # foreign words, places and names near the top of the CLIP ranking
    "sigue": "a Spanish word ('follows')",
    "garza": "Spanish for heron and a common surname",
    "milla": "Spanish for mile and a first name (Milla Jovovich)",
    "nueva": "Spanish for new",
    "allez": "French for 'go'",
    "lisse": "French for smooth and a Dutch town",
    "juli": "German for July",
    "malam": "Malay for night",
    "kilig": "a Filipino word (the thrill of romance)",
    "mirai": "Japanese for future, a film and a car (Toyota Mirai)",
    "sura": "a chapter of the Quran",
    "ratna": "Sanskrit for jewel and a first name",
    "panna": "a dessert (panna cotta) and a place name",
    "islay": "a Scottish island known for its whisky",
    "buda": "half of Budapest",
    "conwy": "a Welsh town and castle",
    "pasco": "a US county and a surname",
    "loeb": "a surname of public figures (Sebastien Loeb, Lisa Loeb)",
    "wylie": "a surname and first name",
    "patil": "a common Indian surname",
    "sacha": "a first name (Sacha Baron Cohen)",
    "mikel": "a first name (Mikel Arteta)",
    "soca": "a music genre",
    "opi": "a nail-polish brand (OPI)",
    "muc": "Munich airport's code (MUC)",
    # real words the vocabulary does not flag (no inflected forms among its whole words)
    "rune": "an English word (a letter of an old alphabet)",
    "abide": "an English word",
    "emit": "an English word",
    "kilt": "an English word (a Scottish skirt)",
    "blob": "an English word",
    "quill": "an English word (a feather pen)",
    "bazar": "a spelling of 'bazaar' (a market)",
    "fryer": "an English word (a deep fryer)",
    "ethos": "an English word",
    "sown": "an English word",
}


@dataclass(frozen=True)
class Candidate:
    """One ranked identifier: ``token`` is what goes in the prompt (no ``</w>``)."""

    rank: int
    token: str
    id: int
    merge_rank: int
    reason: str
    te_similarity: float | None = None  # to the nearest common word; None without a text encoder
    nearest_word: str | None = None


# ------------------------------------------------------------------ pure vocabulary math


def merge_ranks(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """token -> the index of the merge that created it (0 = the first, most frequent merge)."""
    return {a + b: i for i, (a, b) in enumerate(merges)}


def bpe(word: str, ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lowercase word: the tokens it becomes (the last one ends in ``</w>``)."""
    parts = list(word[:-1]) + [word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):  # merge every occurrence of (a, b), left to right, like CLIP
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def shape_problem(word: str) -> str | None:
    """Why ``word`` does not look like a usable identifier, or None.

    Usable: 3-5 ASCII lowercase letters with a vowel (a e i o u, or y after the first letter)
    and a consonant; no consonant pair at the start or end, no run of three consonants or three
    vowels (so syllables look like "ka", "lom": pronounceable, not an acronym like "rcn").
    """
    if not word.isascii():
        return "has non-ASCII characters"
    if any(c.isdigit() for c in word):
        return "has digits"
    if not word.isalpha():
        return "has characters other than letters"
    if word != word.lower():
        return "has capitals (CLIP lowercases every prompt)"
    if not MIN_LEN <= len(word) <= MAX_LEN:
        return f"is {len(word)} letters long (identifiers here are {MIN_LEN}-{MAX_LEN})"
    kinds = "".join("v" if c in VOWELS or (c == "y" and i > 0) else "c" for i, c in enumerate(word))
    if "v" not in kinds or "c" not in kinds:
        return "needs both a vowel and a consonant to be pronounceable"
    if kinds.startswith("cc") or kinds.endswith("cc") or "ccc" in kinds or "vvv" in kinds:
        return "has a consonant cluster at an edge or three consonants/vowels in a row (hard to say, acronym-like)"
    return None


def word_evidence(word: str, vocab: Mapping[str, int]) -> str | None:
    """A sign from the vocabulary itself that ``word`` is a real word: its inflections (or its
    stem) are whole-word tokens too. None when there is no such sign."""
    for suffix in INFLECTIONS:
        if word + suffix + END in vocab:
            return f"looks like a real word: the vocabulary also has '{word + suffix}'"
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and len(stem) >= 3 and stem + END in vocab:
            return f"looks like a real word: the vocabulary also has '{stem}'"
    return None


def exclusion(word: str, vocab: Mapping[str, int], ranks: Mapping[str, int],
              pair_ranks: Mapping[tuple[str, str], int], common: int = COMMON_MERGES) -> str | None:
    """Why the whole-word token ``word`` cannot be a candidate, or None when it can."""
    token = word + END
    if word in KNOWN_MEANINGS:
        return f"{word} is {KNOWN_MEANINGS[word]}"
    problem = shape_problem(word)
    if problem:
        return f"'{word}' {problem}"
    if token not in ranks:
        return f"'{word}' is not a single whole-word token in the vocabulary"
    if ranks[token] < common:
        return (f"'{word}' is a common word (merge {ranks[token]:,} of {len(pair_ranks):,}; the first "
                f"{common:,} are common): the model already has a meaning for it")
    evidence = word_evidence(word, vocab)
    if evidence:
        return f"'{word}' {evidence}"
    if bpe(word, pair_ranks) != [token]:
        return f"'{word}' does not encode to one token ({' + '.join(bpe(word, pair_ranks))})"
    return None


def _reason(merge_rank: int, n_merges: int, sim: float | None, nearest: str | None) -> str:
    text = f"late merge: rarer than {100.0 * merge_rank / n_merges:.1f}% of tokens"
    if sim is not None:
        text += f"; TE output least like any common word (nearest: '{nearest}')" if nearest else \
            "; TE output least like any common word"
    return text


def rank_tokens(
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    count: int = 10,
    te_similarity: Mapping[int, float] | None = None,
    te_nearest: Mapping[int, str] | None = None,
    pool: int = POOL,
    accept: Callable[[str, int], bool] | None = None,
    common: int = COMMON_MERGES,
) -> list[Candidate]:
    """The ``count`` best identifier tokens of a BPE vocabulary, best first. Pure and deterministic.

    ``vocab`` maps token (``"sks</w>"``) -> id; ``merges`` is the BPE merge list in learned order.
    Candidates pass ``exclusion`` and are ordered by merge rank, latest (rarest) first. With
    ``te_similarity`` (token id -> similarity to the nearest common word), the first ``pool``
    candidates that have a number are re-ordered by it, lowest first (ties: vocabulary order,
    then id); candidates without a number follow in vocabulary order. ``accept(word, id)`` can
    drop more (e.g. a check against a real tokenizer) and is called only as far as needed.
    Tokens from the first ``common`` merges are common words, never candidates.
    """
    ranks = merge_ranks(merges)
    pair_ranks = {pair: i for i, pair in enumerate(merges)}
    words = sorted(
        ((ranks[t], vocab[t], t[: -len(END)]) for t in vocab if t.endswith(END) and t in ranks),
        key=lambda r: (-r[0], r[1]),
    )
    # (merge_rank, id, word) in vocabulary order, filtered lazily: only as far as needed
    ordered = (r for r in words if exclusion(r[2], vocab, ranks, pair_ranks, common) is None)
    if te_similarity:
        scored, skipped = [], []
        for r in ordered:
            (scored if r[1] in te_similarity else skipped).append(r)
            if len(scored) == pool:
                break
        position = {r[1]: n for n, r in enumerate(scored)}
        scored.sort(key=lambda r: (te_similarity[r[1]], position[r[1]], r[1]))
        ordered = itertools.chain(scored, skipped, ordered)
    out: list[Candidate] = []
    for merge_rank, tid, word in ordered:
        if len(out) >= count:
            break
        if accept is not None and not accept(word, tid):
            continue
        sim = te_similarity.get(tid) if te_similarity else None
        nearest = te_nearest.get(tid) if te_nearest and sim is not None else None
        out.append(Candidate(rank=len(out) + 1, token=word, id=tid, merge_rank=merge_rank,
                             reason=_reason(merge_rank, len(merges), sim, nearest),
                             te_similarity=sim, nearest_word=nearest))
    return out


def common_words(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], n: int = N_COMMON) -> list[int]:
    """Ids of the ``n`` earliest-merged real words: whole-word tokens of 3+ ASCII letters whose
    inflections are whole words too ("dog" has "dogs"), so fragments like "cked" stay out."""
    found = []
    for a, b in merges:
        t = a + b
        word = t[: -len(END)]
        if t.endswith(END) and len(word) >= 3 and word.isascii() and word.isalpha() and word_evidence(word, vocab):
            found.append(vocab[t])
            if len(found) == n:
                break
    return found


# ------------------------------------------------------------------ tokenizer and text encoder


def vocabulary(tokenizer=None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of ``tokenizer``; the vendored CLIP vocabulary when it is CLIP's or None."""
    from dreambooth.tokenizer import clip_vocab

    if tokenizer is None:
        return clip_vocab()
    vocab = tokenizer.get_vocab()
    if len(vocab) == 49408 and vocab.get("sks</w>") == 48136:  # SD 1.x / 2.x / SDXL all share it
        return clip_vocab()
    import json

    from dreambooth.errors import ModelError

    try:
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ModelError(f"cannot rank identifiers for a {type(tokenizer).__name__}: it is not a BPE "
                         "tokenizer with merges; pass data.token=WORD yourself") from e
    return dict(vocab), merges


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def single_token(tokenizer, word: str, token_id: int) -> bool:
    """True when ``word`` encodes to exactly ``[token_id]`` alone and inside PROMPT_CHECK."""
    if _encode(tokenizer, word) != [token_id]:
        return False
    before, after = PROMPT_CHECK.split("{}")
    expected = _encode(tokenizer, before.strip()) + [token_id] + _encode(tokenizer, after.strip())
    return _encode(tokenizer, PROMPT_CHECK.format(word)) == expected


@dataclass(frozen=True)
class TESignal:
    similarity: dict[int, float]  # token id -> cosine similarity to the nearest common word
    nearest: dict[int, str]  # token id -> that word


def text_encoder_similarity(tokenizer, text_encoder, token_ids: Sequence[int], common_ids: Sequence[int],
                            template: str = TEMPLATE, batch_size: int = 256) -> TESignal:
    """How close each token's text-encoder output is to that of ordinary words.

    Each token is read at the end of ``template`` ("a photo of a TOKEN"): CLIP's text encoder is
    causal, so this is also its output at that position in any longer prompt. Outputs are
    centered on the common words' mean (CLIP's outputs all share a large common direction), and
    the similarity is the cosine to the most similar common word.
    """
    import torch

    prefix = list(tokenizer(template).input_ids)
    if prefix and prefix[-1] == tokenizer.eos_token_id:
        prefix = prefix[:-1]
    device = next(text_encoder.parameters()).device

    @torch.inference_mode()
    def features(ids: Sequence[int]) -> torch.Tensor:
        out = []
        for start in range(0, len(ids), batch_size):
            chunk = torch.tensor([prefix + [i] for i in ids[start : start + batch_size]], device=device)
            out.append(text_encoder(input_ids=chunk).last_hidden_state[:, -1].float().cpu())
        return torch.cat(out)

    was_training = text_encoder.training
    text_encoder.eval()
    try:
        common, cands = features(list(common_ids)), features(list(token_ids))
    finally:
        text_encoder.train(was_training)
    mean = common.mean(0, keepdim=True)
    common = torch.nn.functional.normalize(common - mean, dim=-1)
    cands = torch.nn.functional.normalize(cands - mean, dim=-1)
    sims = cands @ common.T
    best, where = sims.max(dim=1)
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    return TESignal(
        similarity={int(t): round(float(s), 6) for t, s in zip(token_ids, best)},
        nearest={int(t): id_to_token[int(common_ids[int(w)])].removesuffix(END) for t, w in zip(token_ids, where)},
    )


def top_candidates(tokenizer=None, text_encoder=None, count: int = 10, pool: int = POOL) -> list[Candidate]:
    """Rank ``tokenizer``'s vocabulary (CLIP's when None); re-rank by ``text_encoder`` when given.

    Every returned token has been checked to encode to one id with ``tokenizer`` (when given).
    """
    vocab, merges = vocabulary(tokenizer)
    accept = (lambda word, tid: single_token(tokenizer, word, tid)) if tokenizer is not None else None
    if text_encoder is None:
        return rank_tokens(vocab, merges, count, accept=accept)
    pool = max(pool, count)
    shortlist = rank_tokens(vocab, merges, pool)
    signal = text_encoder_similarity(tokenizer, text_encoder, [c.id for c in shortlist], common_words(vocab, merges))
    return rank_tokens(vocab, merges, count, te_similarity=signal.similarity, te_nearest=signal.nearest,
                       pool=pool, accept=accept)


def pick_token(tokenizer=None, text_encoder=None) -> str:
    """The top-ranked identifier (what ``data.token: auto`` becomes). Vocabulary-only and fast
    without a text encoder; with one, the vocabulary's top ``POOL`` re-ranked by it."""
    from dreambooth.errors import DreamboothError

    best = top_candidates(tokenizer, text_encoder, count=1)
    if not best:
        raise DreamboothError("no usable identifier token in this tokenizer's vocabulary; set data.token=WORD")
    return best[0].token


def check_token(token: str, tokenizer=None) -> list[str]:
    """Problems with a user-chosen identifier, one sentence each; [] when it looks fine."""
    if tokenizer is None:
        from dreambooth.tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer()
    word = token.strip()
    problems = []
    if word.lower() in KNOWN_MEANINGS:
        problems.append(f"{word.lower()} is {KNOWN_MEANINGS[word.lower()]}")
    ids = _encode(tokenizer, word)
    vocab, merges = vocabulary(tokenizer)
    id_to_token = {i: t for t, i in vocab.items()}
    if len(ids) != 1:
        pieces = " + ".join(id_to_token.get(i, str(i)) for i in ids)
        problems.append(f"'{word}' encodes to {len(ids)} tokens ({pieces}), not one: the subject "
                        "gets spread over several embeddings that also appear in other words")
    elif not single_token(tokenizer, word, ids[0]):
        problems.append(f"'{word}' encodes differently inside '{PROMPT_CHECK.format(word)}'")
    if len(ids) == 1:
        ranks = merge_ranks(merges)
        t = id_to_token.get(ids[0], "")
        if not t.endswith(END):
            problems.append(f"'{word}' is a word piece ({t}), not a whole word")
        elif t in ranks and ranks[t] < COMMON_MERGES:
            problems.append(f"'{word}' is a common word (merge {ranks[t]:,} of {len(merges):,}; the first "
                            f"{COMMON_MERGES:,} are common): the model already has a meaning for it")
        elif t.endswith(END):
            evidence = word_evidence(t.removesuffix(END), vocab)
            if evidence:
                problems.append(f"'{word}' {evidence}")
    shape = shape_problem(word)
    if shape:
        problems.append(f"'{word}' {shape}")
    return problems


def describe_token(token: str, tokenizer=None) -> dict:
    """Facts about ``token`` for ``dreambooth tokens --check``: ids, merge rank, rank among candidates."""
    if tokenizer is None:
        from dreambooth.tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer()
    vocab, merges = vocabulary(tokenizer)
    ids = _encode(tokenizer, token.strip())
    id_to_token = {i: t for t, i in vocab.items()}
    info = {"ids": ids, "pieces": [id_to_token.get(i, str(i)) for i in ids], "merge_rank": None,
            "rarer_than": None, "candidate_rank": None}
    if len(ids) == 1:
        mr = merge_ranks(merges).get(id_to_token.get(ids[0], ""))
        if mr is not None:
            info.update(merge_rank=mr, rarer_than=100.0 * mr / len(merges))
            ranks, pair_ranks = merge_ranks(merges), {p: i for i, p in enumerate(merges)}
            word = id_to_token[ids[0]].removesuffix(END)
            if id_to_token[ids[0]].endswith(END) and exclusion(word, vocab, ranks, pair_ranks) is None:
                # candidates are ordered by merge rank: count the ones merged later that also pass
                info["candidate_rank"] = 1 + sum(
                    1 for t, r in ranks.items()
                    if r > mr and t.endswith(END) and exclusion(t.removesuffix(END), vocab, ranks, pair_ranks) is None
                )
    return info
