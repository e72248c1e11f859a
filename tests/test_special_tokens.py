"""User text is tokenized as text: literal special-token strings never become special-token ids."""

from __future__ import annotations

import numpy as np

from e5kit import E5


def _check(m: E5, specials: tuple[str, ...]) -> None:
    tok = m.engine.tokenizer
    special_ids = {tok.token_to_id(s) for s in specials}
    assert None not in special_ids, specials
    text = "a " + " ".join(specials) + " b"
    ids = m.tokenize([text])[0]
    # Only the template's own first and last tokens are special.
    assert not special_ids & set(ids[1:-1]), ids
    enc = tok.encode(text)
    assert enc.special_tokens_mask[1:-1] == [0] * (len(enc.ids) - 2)
    assert m.engine.count_tokens([text])[0] == len(ids)  # the untruncated count agrees
    # Ordinary text tokenizes as before, ids still map back to the special tokens.
    assert tok.token_to_id(specials[0]) in {ids[0], ids[-1]} or specials[0] not in ("<s>", "[CLS]")


def test_literal_special_tokens_are_text_wordpiece(tiny_bert):
    _check(E5(str(tiny_bert)), ("[CLS]", "[SEP]", "[PAD]"))


def test_literal_special_tokens_are_text_sentencepiece(ml_e5):
    m = E5(str(ml_e5))
    _check(m, ("<s>", "</s>", "<pad>", "<unk>"))
    # The vector of a text with a literal "</s>" is the vector of that text, not of a cut sequence.
    clean, odd = m.encode_queries(["protein for women", "protein </s> for women"])
    assert float(clean @ odd) > 0.85
    assert np.isfinite(odd).all()
