"""The new-subject form's logic without a browser: identifier picks follow the chosen base
model's tokenizer (`dreambooth tokens`' ranking, what `train` picks for data.token=auto)."""

import json

import pytest

pytest.importorskip("starlette", reason="the ui extra is not installed: pip install -e '.[ui]'")

from dreambooth.identifier import check_token, top_candidates  # noqa: E402
from dreambooth.tokenizer import BOS, EOS, clip_vocab  # noqa: E402
from dreambooth.ui import forms  # noqa: E402


def model_with_small_vocabulary(folder, merges: int = 30_000):
    """A model folder whose tokenizer/ knows only CLIP's first ``merges`` merges: its rarest
    whole words, and so its identifier picks, are not CLIP's."""
    from transformers import CLIPTokenizer

    vocab, all_merges = clip_vocab()
    kept = all_merges[:merges]
    small = {t: i for i, t in enumerate(list(vocab)[:512])}
    for a, b in kept:
        small.setdefault(a + b, len(small))
    small[BOS], small[EOS] = len(small), len(small) + 1
    tokenizer = CLIPTokenizer(vocab=small, merges=list(kept), pad_token=EOS, model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)


def test_identifier_picks_follow_the_chosen_models_tokenizer(tmp_path):
    tokenizer = model_with_small_vocabulary(tmp_path / "model")
    clip = [c.token for c in top_candidates(None, count=8)]
    assert [t["token"] for t in forms.token_suggestions("tiny")["tokens"]] == clip  # tiny: CLIP's vocabulary

    picks = forms.token_suggestions(str(tmp_path / "model"))
    ours = [t["token"] for t in picks["tokens"]]
    assert ours == [c.token for c in top_candidates(tokenizer, count=8)] and not picks["note"]
    assert ours != clip
    for token in ours:  # each one is one id of this tokenizer
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    # and the identifier check reads with the same tokenizer
    assert forms.token_warnings(clip[0], str(tmp_path / "model")) == check_token(clip[0], tokenizer)
    assert forms.token_warnings(clip[0], "tiny") == []


def test_a_tokenizer_that_cannot_be_ranked_says_so(tmp_path):
    from dreambooth.tiny import t5_tokenizer

    (tmp_path / "model").mkdir()
    t5_tokenizer().save_pretrained(tmp_path / "model" / "tokenizer")  # a Unigram vocabulary, no BPE merges
    picks = forms.token_suggestions(str(tmp_path / "model"))
    assert picks["tokens"] == [] and picks["note"]
