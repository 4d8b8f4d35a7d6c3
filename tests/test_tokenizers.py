"""The offline CLIP tokenizer equals open_clip's tokenisation (same BPE, same special tokens)."""

from __future__ import annotations

from mmalign.tokenizers import CLIP_VOCAB_SIZE, write_clip_tokenizer


def test_clip_tokenizer_matches_open_clip(tmp_path):
    import open_clip
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path)))
    reference = open_clip.get_tokenizer("ViT-H-14")
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    for text in ["A photo of a cat", "Two RED circles, on the left!!  émigré naïve 😀 8k", "word " * 120, ""]:
        ours = tokenizer(text, truncation=True, max_length=77).input_ids
        theirs = [int(t) for t in reference([text])[0] if t != 0]
        assert ours == theirs, text
