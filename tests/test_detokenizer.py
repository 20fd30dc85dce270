"""Incremental detokenization: deltas add up to the full text; stop strings are cut and held back."""

from tiny_models import byte_tokenizer

from tuneserve.tokenizer import IncrementalDetokenizer

TOK = byte_tokenizer()


def feed(detok, ids, step=1):
    parts = []
    for i in range(0, len(ids), step):
        parts.append(detok.add(ids[i:i + step]))
        if detok.stopped:
            break
    if not detok.stopped:
        parts.append(detok.flush())
    return parts


def test_deltas_add_up_to_the_text_with_multibyte_chars():
    text = "héllo wörld ✓ done"
    ids = TOK(text).input_ids
    d = IncrementalDetokenizer(TOK, TOK("prompt").input_ids)
    parts = feed(d, ids)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_across_tokens_is_cut_and_never_sent():
    ids = TOK("abc STOP def").input_ids
    d = IncrementalDetokenizer(TOK, [], stop=("STOP",))
    parts = feed(d, ids)
    assert "".join(parts) == "abc " and d.stopped == "STOP"
    assert not any("S" in p for p in parts)


def test_stop_string_included_when_asked():
    d = IncrementalDetokenizer(TOK, [], stop=("ST",), include_stop=True)
    assert "".join(feed(d, TOK("xxSTyy").input_ids, step=3)) == "xxST"


def test_earliest_stop_string_wins():
    d = IncrementalDetokenizer(TOK, [], stop=("yy", "x"))
    assert "".join(feed(d, TOK("ayyx").input_ids, step=4)) == "a"


def test_work_per_token_stays_bounded_over_a_long_output():
    d = IncrementalDetokenizer(TOK, [], stop=("never appears",))
    ids = TOK("the same words again and again " * 200).input_ids
    out = []
    for t in ids:
        out.append(d.add([t]))
        assert len(d.pending) <= len("never appears") - 1 + 40  # held-back tail + the newest piece, no more
    out.append(d.flush())
    assert "".join(out) == TOK.decode(ids)
