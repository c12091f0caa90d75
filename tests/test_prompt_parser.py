"""A1111 prompt language: AND, editing/alternation schedules, emphasis, chunking (spec §1, §2, §6.4).

Expected values are the worked examples of docs/generation-semantics.md §1.7 (verbatim) and values
derived by hand from the grammar / algorithm in §1.1–§1.6. Float weights are written as the
multiplication sequence the spec prescribes (e.g. ``1.1 * 1.1``), never pasted from a run.
"""
from pathlib import Path

import numpy as np
import pytest

from sdfc.engine.prompt_chunks import (PromptChunker, apply_emphasis, chunk_batches, clip_text_fixups,
                                       encode_texts, load_clip_tokenizer, make_clip_encode_fn,
                                       pad_cond_uncond_v0, pad_cond_uncond_with_empty,
                                       pad_to_same_length)
from sdfc.engine.prompt_parser import (get_learned_conditioning_prompt_schedules,
                                       get_multicond_prompt_list, is_break_marker,
                                       parse_prompt_attention, schedule_index_at_call,
                                       scheduled_text_at_call, split_and_subprompts)
from sdfc.engine.samplers import find_sampler

TOKENIZER_JSON = Path(__file__).parent / "fixtures/models/tiny-sd/tokenizer/tokenizer.json"
SQ = 1 / 1.1  # the square-bracket multiplier (§1.3)

# ---------------------------------------------------------------------------------------------
# §1.3 attention parser
# ---------------------------------------------------------------------------------------------

SPEC_ATTENTION = [  # §1.7 #1–#23, verbatim
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((cat))", [("cat", 1.2100000000000002)]),
    ("[[dog]]", [("dog", 0.8264462809917354)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("[cat:1.5]", [("cat:1.5", 0.9090909090909091)]),
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("((a:1.2) b:0.5)", [("a", 0.6), (" b", 0.5)]),
    ("unmatched )) and ]]", [("unmatched )) and ]]", 1.0)]),
    ("a [b", [("a ", 1.0), ("b", 0.9090909090909091)]),
    ("cat BREAK dog", [("cat", 1), ("BREAK", -1), ("dog", 1)]),
    ("(cat BREAK dog:1.2)", [("cat", 1.2), ("BREAK", -1.2), ("dog", 1.2)]),
    ("BREAK", [("", 1), ("BREAK", -1), ("", 1)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(masterpiece, best quality:1.2), 1girl", [("masterpiece, best quality", 1.2), (", 1girl", 1.0)]),
    ("(x:.5)", [("x", 0.5)]),
    (r"\(x:1.5)", [("(x:1.5)", 1.0)]),
    ("", [("", 1.0)]),
]

MORE_ATTENTION = [  # derived from the §1.3 token list and algorithm
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("( a : 2 )", [(" a ", 2.0)]),
    ("(a:+1.5)", [("a", 1.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),                        # "e" is not in [.\d]: no weight token
    ("(a (b:2) c)", [("a ", 1.1), ("b", 2.0 * 1.1), (" c", 1.1)]),
    ("(a [[b]] c)", [("a ", 1.1), ("b", 1.0 * SQ * SQ * 1.1), (" c", 1.1)]),
    ("((a)", [("a", 1.1 * 1.1)]),                         # the open "(" applies at the end
    ("[(a]", [("a", 1.0 * SQ * 1.1)]),                    # "]" closes first, open "(" at the end
    ("(a))", [("a", 1.1), (")", 1.0)]),
    ("]a[", [("]a", 1.0)]),
    ("((", [("", 1.0)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),                        # ":w)" with no open "(" is text
    ("[a:1.5)]", [("a:1.5)", SQ)]),
    (r"\[x\]", [("[x]", 1.0)]),
    (r"a\\b", [("a\\b", 1.0)]),                           # "\\" -> one backslash
    (r"a\b", [("ab", 1.0)]),                              # a lone backslash appends ""
    (r"(a\)b)", [("a)b", 1.1)]),
    ("a BREAK, b", [("a", 1.0), ("BREAK", -1), (", b", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),                    # \bBREAK\b needs word boundaries
    ("a break b", [("a break b", 1.0)]),                  # case-sensitive
    ("BREAK BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("[cat BREAK dog]", [("cat", SQ), ("BREAK", -1 * SQ), ("dog", SQ)]),
]


@pytest.mark.parametrize("prompt,expected", SPEC_ATTENTION + MORE_ATTENTION)
def test_parse_prompt_attention(prompt, expected):
    assert parse_prompt_attention(prompt) == [[text, weight] for text, weight in expected]


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a:1..)"])
def test_attention_weight_that_float_rejects_raises(prompt):
    with pytest.raises(ValueError):  # §1.7 #24: A1111 fails the generation
        parse_prompt_attention(prompt)


@pytest.mark.parametrize("prompt", ["((((", "))))", "[[(]]", ")(][", "(:", ":)", "[:1.2)", "\\", "(\\",
                                    "((a:1.2)", "a:1.2))", "[a|b", "(" * 500 + "x",
                                    "(" * 300 + "[a:b:1]" + ")" * 300])
def test_unbalanced_never_crashes(prompt):
    parsed = parse_prompt_attention(prompt)
    assert parsed and all(isinstance(w, float) for _, w in parsed)
    assert get_learned_conditioning_prompt_schedules([prompt], 10)[0][-1][0] == 10


def test_only_unbracketed_break_is_a_marker():
    assert is_break_marker(["BREAK", -1.0])
    assert not is_break_marker(["BREAK", -1.2])
    assert not is_break_marker(["break", -1.0])


# ---------------------------------------------------------------------------------------------
# §1.1 AND
# ---------------------------------------------------------------------------------------------

AND_CASES = [
    ("a cat :1.2 AND a dog:-0.5", [("a cat", 1.2), (" a dog", -0.5)]),  # §1.1 verbatim
    ("cat", [("cat", 1.0)]),
    ("cat   ", [("cat", 1.0)]),                       # trailing whitespace removed
    ("  cat", [("  cat", 1.0)]),                      # leading whitespace kept
    ("ANDROID AND robot", [("ANDROID", 1.0), (" robot", 1.0)]),
    ("cat and dog", [("cat and dog", 1.0)]),          # case-sensitive
    ("a ANDb", [("a ANDb", 1.0)]),
    ("cat:1.5", [("cat", 1.5)]),                      # a weight even without AND
    ("cat : 2 ", [("cat", 2.0)]),
    ("cat:.5 AND dog:5.", [("cat", 0.5), (" dog", 5.0)]),
    ("(cat:1.5)", [("(cat:1.5)", 1.0)]),              # ends with ")": not a sub-prompt weight
    ("cat:x", [("cat:x", 1.0)]),
    ("[cat:dog:5]", [("[cat:dog:5]", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a AND b:0 AND c", [("a", 1.0), (" b", 0.0), (" c", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", AND_CASES)
def test_split_and_subprompts(prompt, expected):
    assert split_and_subprompts(prompt) == expected


def test_multicond_deduplicates_subprompt_texts():
    indexes, texts, text_to_index = get_multicond_prompt_list(["cat AND dog:0.5", "cat AND bird", "cat"])
    assert texts == ["cat", " dog", " bird"]
    assert indexes == [[(0, 1.0), (1, 0.5)], [(0, 1.0), (2, 1.0)], [(0, 1.0)]]
    assert text_to_index == {"cat": 0, " dog": 1, " bird": 2}


# ---------------------------------------------------------------------------------------------
# §1.2 schedules
# ---------------------------------------------------------------------------------------------

def _alternating(options, steps, template="{}"):
    return [(t, template.format(options[(t - 1) % len(options)])) for t in range(1, steps + 1)]


SPEC_SCHEDULES = [  # §1.7 #25–#43 verbatim: (prompt, steps, schedule)
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, _alternating(["a", "(b:1.1)"], 10)),
    ("[fe|||]male", 10, _alternating(["fe", "", "", ""], 10, "{}male")),
    ("a [cat:dog:0.25] b", 10, [(2, "a cat b"), (10, "a dog b")]),
    ("a [cat:dog:0.25] b", 20, [(5, "a cat b"), (20, "a dog b")]),
    ("[cat:dog:0.33]", 20, [(6, "cat"), (20, "dog")]),
    ("[cat:dog:1.0]", 10, [(10, "cat")]),
    ("[cat:dog:1]", 10, [(1, "cat"), (10, "dog")]),
    ("[cat:dog:0]", 10, [(10, "dog")]),
    ("[cat:dog:25]", 10, [(10, "cat")]),
    ("[cat::0.5] x", 10, [(5, "cat x"), (10, " x")]),
    ("[a|b|c] d", 10, _alternating(["a", "b", "c"], 10, "{} d")),
    ("[mountain:lake:0.25] [an oak:a christmas tree:0.75][ in foreground::0.6]", 10,
     [(2, "mountain an oak in foreground"), (6, "lake an oak in foreground"), (7, "lake an oak"),
      (10, "lake a christmas tree")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),  # §1.2: no parse -> verbatim
]

MORE_SCHEDULES = [  # derived from the §1.2 grammar and step rules
    ("", 10, [(10, "")]),
    ("plain text, (emphasis:1.2)", 10, [(10, "plain text, (emphasis:1.2)")]),
    ("[a: 3 ]", 10, [(3, ""), (10, "a")]),           # [WS] NUMBER [WS]
    ("[a:b :3]", 10, [(3, "a"), (10, "b ")]),
    ("[:3]", 5, [(3, ""), (5, "")]),
    ("a [b:c:-3]", 10, [(10, "a c")]),               # when < 1 is no boundary: always "after"
    ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),       # SIGNED_NUMBER exponent, no "." -> a step
    ("[a:b:5.]", 4, [(4, "a")]),                     # "5." is a fraction: 20 steps -> clamped
    ("[(a:1.2):b:5]", 10, [(5, "(a:1.2)"), (10, "b")]),
    ("[[a:b:2]|c]", 4, [(1, "a"), (2, "c"), (3, "b"), (4, "c")]),
    ("[a|[b|c]]", 4, [(1, "a"), (2, "c"), (3, "a"), (4, "c")]),  # inner [b|c] sees the same step
    ("[a:b:c:3]", 10, [(10, "[a:b:c:3]")]),          # three colons: literal brackets
    (r"\[a:b:3\]", 10, [(10, r"\[a:b:3\]")]),        # escaped brackets are plain text
    ("[a:b:3", 10, [(10, "[a:b:3")]),
    ("[cat:dog:0.5] a|b", 10, [(10, "[cat:dog:0.5] a|b")]),  # "|" outside [..|..]: no parse at all
    ("[a|b:3] [c:2]", 4, [(4, "[a|b:3] [c:2]")]),
    ("(x [a|b] y:z:w)", 2, [(1, "(x a y:z:w)"), (2, "(x b y:z:w)")]),  # invalid ( ) is literal
]


@pytest.mark.parametrize("prompt,steps,expected", SPEC_SCHEDULES + MORE_SCHEDULES)
def test_prompt_schedules(prompt, steps, expected):
    result = get_learned_conditioning_prompt_schedules([prompt], steps)
    assert result == [[[t, text] for t, text in expected]]


HIRES_SCHEDULES = [  # §1.7 #44–#47: base 20, hires 10
    ("a [b:.5] c", [(10, "a b c")]),
    ("a [b:1.5] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:25] c", [(5, "a  c"), (10, "a b c")]),
    ("a [b:5] c", [(10, "a b c")]),
    ("a [b:2.0] c", [(10, "a  c")]),                 # (2.0 - 1) * 10 = 10 -> "before" all pass
    ("[a|b]", _alternating(["a", "b"], 10)),          # alternation runs over the hires steps
]


@pytest.mark.parametrize("prompt,expected", HIRES_SCHEDULES)
def test_hires_schedules(prompt, expected):
    result = get_learned_conditioning_prompt_schedules([prompt], 20, hires_steps=10)
    assert result == [[[t, text] for t, text in expected]]


@pytest.mark.parametrize("prompt,base,hires,expected", [
    ("a [b:1.0] c", 20, None, [(1, "a  c"), (20, "a b c")]),    # §1.7 #48
    ("a [b:0.5] c", 20, None, [(10, "a  c"), (20, "a b c")]),
    ("a [b:15] c", 20, 10, [(15, "a  c"), (20, "a b c")]),       # old: base steps in both passes
])
def test_old_scheduling(prompt, base, hires, expected):
    result = get_learned_conditioning_prompt_schedules([prompt], base, hires, use_old_scheduling=True)
    assert result == [[[t, text] for t, text in expected]]


def test_schedules_keep_prompt_order_and_duplicates():
    result = get_learned_conditioning_prompt_schedules(["[a:b:2]", "c", "[a:b:2]"], 4)
    assert result == [[[2, "a"], [4, "b"]], [[4, "c"]], [[2, "a"], [4, "b"]]]


# §1.7 "per-call conditioning": the 0-based call counter against 1-based boundaries (§6.4)
@pytest.mark.parametrize("prompt,steps,sampler,calls,expected", [
    ("[cat:dog:3]", 6, "Euler", 6, ["cat"] * 4 + ["dog"] * 2),
    ("[a|b|c]", 7, "Euler", 7, ["a", "a", "b", "c", "a", "b", "c"]),
    ("[cat:dog:0.5]", 10, "Heun", 19, ["cat"] * 11 + ["dog"] * 8),
    ("[cat:dog:0.25]", 10, "Euler a", 10, ["cat"] * 3 + ["dog"] * 7),  # §1.2 example
    ("[a|b]", 6, "Euler", 6, ["a", "a", "b", "a", "b", "a"]),
])
def test_text_per_denoiser_call(prompt, steps, sampler, calls, expected):
    [schedule] = get_learned_conditioning_prompt_schedules(
        [prompt], find_sampler(sampler).prompt_schedule_steps(steps))
    assert [scheduled_text_at_call(schedule, k) for k in range(calls)] == expected


def test_schedule_steps_double_for_second_order_samplers():
    steps = [find_sampler(s).prompt_schedule_steps(10) for s in ["Euler", "Heun", "DPM2 a", "DPM++ 2S a", "DPM++ 2M"]]
    assert steps == [10, 20, 20, 20, 10]


def test_call_past_last_boundary_uses_first_entry():
    assert schedule_index_at_call([[2, "cat"], [4, "dog"]], 5) == 0


# ---------------------------------------------------------------------------------------------
# §1.4 tokenizer and chunks (real CLIP vocabulary)
# ---------------------------------------------------------------------------------------------

CAT, DOG, COMMA, BREAK_WORD, BOS, EOS = 2368, 1929, 267, 2568, 49406, 49407


@pytest.fixture(scope="module")
def encode_fn():
    return make_clip_encode_fn(load_clip_tokenizer(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def chunker(encode_fn):
    return PromptChunker(encode_fn)


@pytest.mark.parametrize("text,ids", [
    ("a photo of", [320, 1125, 539]),
    ("A  Photo\tOF", [320, 1125, 539]),   # lower-cased, whitespace collapsed
    ("  cat  ", [CAT]),
    ("cat, dog", [CAT, COMMA, DOG]),
    ("break", [BREAK_WORD]),
    ("", []),
])
def test_clip_encode_fn(encode_fn, text, ids):
    assert encode_fn([text]) == [ids]


def test_ftfy_like_fixups(encode_fn):
    assert clip_text_fixups("it\u2019s \u201cx\u201d \ufb01sh \uff43\uff41\uff54\u3000&amp;") == 'it\'s "x" fish cat &'
    assert clip_text_fixups("<b>&amp;") == "<b>&amp;"   # ftfy leaves entities alone next to markup
    assert encode_fn(["\uff43\uff41\uff54"]) == [[CAT]]


def _chunk(body, weights=None):
    """Expected chunk: BOS + body + EOS padding to 76 + EOS."""
    weights = [1.0] * len(body) if weights is None else weights
    pad = 75 - len(body)
    return [BOS] + body + [EOS] * (pad + 1), [1.0] + weights + [1.0] * (pad + 1)


def _words(word, n):
    return " ".join([word] * n)


CHUNK_CASES = [  # §1.4 consequences, plus derived cases: (prompt, expected bodies)
    (_words("cat", 70) + ", " + _words("dog", 10), [[CAT] * 70 + [COMMA], [DOG] * 10]),
    (_words("cat", 50) + ", " + _words("dog", 30), [[CAT] * 50 + [COMMA] + [DOG] * 24, [DOG] * 6]),
    (_words("cat", 75), [[CAT] * 75]),
    (_words("cat", 76), [[CAT] * 75, [CAT]]),
    (_words("cat", 74) + ", dog", [[CAT] * 74 + [COMMA], [DOG]]),
    (_words("cat", 55) + ", " + _words("dog", 30), [[CAT] * 55 + [COMMA], [DOG] * 30]),  # 75-55 = 20
    (_words("cat", 54) + ", " + _words("dog", 30), [[CAT] * 54 + [COMMA] + [DOG] * 20, [DOG] * 10]),
    (_words("cat", 75) + ", dog", [[CAT] * 75, [COMMA, DOG]]),   # comma opens chunk 2
    (_words("cat", 150), [[CAT] * 75, [CAT] * 75]),
    ("cat BREAK dog", [[CAT], [DOG]]),
    ("a BREAK BREAK b", [[320], [], [321]]),
    ("BREAK", [[]]),                    # the BREAK closes an empty chunk; nothing follows it
    ("cat BREAK", [[CAT]]),
    ("", [[]]),
    (_words("cat", 3) + " BREAK " + _words("dog", 76), [[CAT] * 3, [DOG] * 75, [DOG]]),
]


@pytest.mark.parametrize("prompt,bodies", CHUNK_CASES)
def test_chunks(chunker, prompt, bodies):
    chunks = chunker.chunks(prompt)
    assert [c.tokens for c in chunks] == [_chunk(body)[0] for body in bodies]
    assert all(c.multipliers == [1.0] * 77 for c in chunks)


def test_chunk_multipliers_follow_tokens_through_comma_backoff(chunker):
    chunks = chunker.chunks(_words("cat", 70) + ", (" + _words("dog", 10) + ":1.5)")
    assert [(c.tokens, c.multipliers) for c in chunks] == [
        _chunk([CAT] * 70 + [COMMA]), _chunk([DOG] * 10, [1.5] * 10)]


def test_fragments_are_tokenized_separately(chunker, encode_fn):
    [chunk] = chunker.chunks("(cat)s")
    assert chunk.tokens[1:2 + len(encode_fn(["s"])[0])] == [CAT] + encode_fn(["s"])[0]
    assert chunk.multipliers[1] == 1.1 and chunk.multipliers[2] == 1.0


def test_break_inside_brackets_is_the_word_break(chunker):
    [chunk] = chunker.chunks("(cat BREAK dog:1.2)")
    assert chunk.tokens[:5] == [BOS, CAT, BREAK_WORD, DOG, EOS]
    assert chunk.multipliers[:5] == [1.0, 1.2, -1.2, 1.2, 1.0]


def test_comma_backtrack_zero_disables_backoff(encode_fn):
    chunks = PromptChunker(encode_fn, comma_padding_backtrack=0).chunks(
        _words("cat", 70) + ", " + _words("dog", 10))
    assert [c.tokens for c in chunks] == [_chunk([CAT] * 70 + [COMMA] + [DOG] * 4)[0], _chunk([DOG] * 6)[0]]


@pytest.mark.parametrize("mode,n_chunks,cat_multiplier", [
    ("Original", 2, 1.1), ("No norm", 2, 1.1), ("Ignore", 2, 1.1), ("None", 1, 1.0)])
def test_emphasis_mode_parsing(chunker, encode_fn, mode, n_chunks, cat_multiplier):
    chunks = chunker.chunks("(cat) BREAK dog", emphasis=mode)
    assert len(chunks) == n_chunks
    if mode == "None":  # one literal fragment: brackets and BREAK are text
        body = encode_fn(["(cat) BREAK dog"])[0]
        assert chunks[0].tokens == _chunk(body)[0] and BREAK_WORD in body
    assert chunks[0].multipliers[1] == cat_multiplier


def test_openclip_pad_after_first_eos(encode_fn):
    chunker = PromptChunker(encode_fn, pad=0)
    [(tokens, _)] = chunk_batches([chunker.chunks("cat dog")], chunker)
    assert tokens[0].tolist() == [BOS, CAT, DOG, EOS] + [0] * 73


# ---------------------------------------------------------------------------------------------
# §1.5 emphasis math and concatenation, §1.6 lengths
# ---------------------------------------------------------------------------------------------

def test_emphasis_original_worked_example():
    z = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    out = apply_emphasis(z, np.array([1, 1.5, 1]), "Original")
    expected = [[0.857143, 1.714286], [3.857143, 5.142857], [4.285714, 5.142857]]  # §1.5
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_emphasis_mean_is_batch_global():
    z = np.array([[[1, 2]], [[3, 4]]], dtype=np.float32)  # B=2, T=1, C=2
    m = np.array([[2.0], [1.0]])
    factor = 2.5 / 3.25  # mean(z) = 2.5; mean(z * m) = (2 + 4 + 3 + 4) / 4
    np.testing.assert_allclose(apply_emphasis(z, m, "Original"),
                               [[[2 * factor, 4 * factor]], [[3 * factor, 4 * factor]]], rtol=1e-6)


@pytest.mark.parametrize("mode,expected", [
    ("No norm", [[1, 2], [4.5, 6], [5, 6]]),
    ("Ignore", [[1, 2], [3, 4], [5, 6]]),
    ("None", [[1, 2], [3, 4], [5, 6]]),
])
def test_emphasis_other_modes(mode, expected):
    z = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    np.testing.assert_allclose(apply_emphasis(z, np.array([1, 1.5, 1]), mode), expected)


def test_unknown_emphasis_mode_is_original():
    z = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
    m = np.array([1, 1.5, 1])
    np.testing.assert_array_equal(apply_emphasis(z, m, "bogus"), apply_emphasis(z, m, "Original"))


def test_encode_texts_concatenates_chunks_and_fills_with_empty_chunk(chunker):
    calls = []

    def fake_encoder(tokens):  # z[b, t] = [token id, 1]
        calls.append(tokens.copy())
        return np.stack([tokens.astype(np.float32), np.ones(tokens.shape, np.float32)], axis=-1)

    z = encode_texts(["(cat)", _words("dog", 80)], chunker, fake_encoder, emphasis="No norm")
    assert z.shape == (2, 154, 2)
    assert len(calls) == 2 and calls[0].shape == (2, 77)
    assert calls[1][0].tolist() == [BOS] + [EOS] * 76          # "(cat)" has no 2nd chunk
    assert z[0, 1].tolist() == pytest.approx([CAT * 1.1, 1.1])
    assert z[1, 77 + 1, 0] == DOG


def test_pad_to_same_length_repeats_last_vector():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.zeros((5, 2), dtype=np.float32)
    padded_a, padded_b = pad_to_same_length([a, b])
    assert padded_a.tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded_b is b


def test_pad_cond_uncond_options():
    cond = np.ones((1, 154, 2), dtype=np.float32)
    uncond = np.zeros((1, 77, 2), dtype=np.float32)
    uncond[0, -1] = 7
    empty = np.full((77, 2), 3, dtype=np.float32)
    c, u = pad_cond_uncond_with_empty(cond, uncond, empty)
    assert c is cond and u.shape == (1, 154, 2) and (u[0, 77:] == 3).all()
    c, u = pad_cond_uncond_with_empty(uncond, cond, empty)   # cond shorter: cond is padded
    assert c.shape == (1, 154, 2) and u is cond
    _, u = pad_cond_uncond_v0(cond, uncond)
    assert u.shape == (1, 154, 2) and (u[0, 76:] == 7).all()
    _, u = pad_cond_uncond_v0(uncond, cond)                    # longer uncond is truncated
    assert u.shape == (1, 77, 2)
