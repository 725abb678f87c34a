"""The real CLIP BPE tokenizer, built offline from the vocabulary vendored in ``assets/``.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's byte-pair vocabulary as shipped in the
open_clip_torch wheel (MIT license, ``assets/LICENSE-open_clip.txt``). Its first line is a
header; the next 48,894 lines are merges in the order they were learned, which is also the
order of the token ids after the 512 byte tokens. Stable Diffusion 1.x/2.x and SDXL use this
same vocabulary, so ids here match theirs ("sks" -> 48136).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each of the 256 byte values, in byte order of the vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@functools.lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) exactly as CLIP and Stable Diffusion number them."""
    lines = gzip.open(BPE_PATH, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_tokens = bytes_to_unicode()
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """A transformers ``CLIPTokenizer`` with the real vocabulary; SD 2.x pads with "!" instead."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH
    )
