"""`dreambooth tokens`: rank rare identifier tokens for "a photo of [V] dog", or check your own."""

from __future__ import annotations


def tokens(model: str | None = None, count: int = 10, check: str | None = None) -> int:
    """List the best rare tokens to bind a subject to ("a photo of TOKEN dog"), or check one.

    Candidates are whole-word BPE tokens of 3-5 pronounceable letters that encode to one token,
    are not common or known words, ranked by how late the BPE learned them (later = rarer).
    With --model, the top few hundred are re-ranked by how unlike ordinary words the model's
    text encoder reads them. docs/identifier.md explains the criterion.

    Args:
        model: base model whose tokenizer and text encoder to use (a diffusers folder, or tiny); default: the CLIP vocabulary alone
        count: how many tokens to list (default 10)
        check: explain whether this token is a good identifier instead of listing (exits 1 if not)
    """
    from dreambooth.errors import ConfigError
    from dreambooth.identifier import KNOWN_MEANINGS, check_token, describe_token, top_candidates

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if check is not None:
        try:
            check.encode("utf-8")
        except UnicodeEncodeError:
            shown = check.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise ConfigError(f"--check '{shown}' is not UTF-8 text (was it typed in another encoding?); "
                              "an identifier is a short word of plain letters, e.g. --check waj") from None
    tokenizer = text_encoder = None
    if model:
        from dreambooth.models import load_base_model

        base = load_base_model(model)
        tokenizer, text_encoder = base.tokenizer, base.text_encoder

    if check is not None:
        info = describe_token(check, tokenizer)
        problems = check_token(check, tokenizer)
        pieces = " + ".join(info["pieces"])
        line = f"'{check}': {len(info['ids'])} token{'s' if len(info['ids']) != 1 else ''} ({pieces}; id {', '.join(map(str, info['ids']))})"
        if info["merge_rank"] is not None:
            line += f", merge {info['merge_rank']:,} (rarer than {info['rarer_than']:.1f}% of tokens)"
        print(line)
        if problems:
            print("not a good identifier:")
            for p in problems:
                print(f"  - {p}")
            return 1
        rank = info["candidate_rank"]
        print(f"looks fine: rank {rank:,} among candidates of `dreambooth tokens`" if rank else "looks fine")
        return 0

    picks = top_candidates(tokenizer, text_encoder, count=count)
    te = text_encoder is not None
    header = f"{'rank':>4}  {'token':<6} {'id':>5}  {'merge':>6}  "
    header += f"{'TE-sim':>6}  {'nearest':<10} " if te else ""
    print(header + "reason")
    for c in picks:
        row = f"{c.rank:>4}  {c.token:<6} {c.id:>5}  {c.merge_rank:>6}  "
        if te:
            sim = f"{c.te_similarity:.3f}" if c.te_similarity is not None else "-"
            row += f"{sim:>6}  {(c.nearest_word or '-'):<10} "
        print(row + c.reason)
    if "sks" not in {c.token for c in picks}:
        print(f"\nnote: 'sks', the token many DreamBooth guides use, is not listed: sks is {KNOWN_MEANINGS['sks']}")
    return 0
