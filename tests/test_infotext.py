"""sdfc.api.infotext against docs/a1111-api.md §1.6, §2.2, §2.4."""
from __future__ import annotations

import json

import pytest

from sdfc.api.infotext import (INFOTEXT_KEY_ORDER, SDFC_VERSION, create_infotext, info_json,
                               parse_generation_parameters, parse_version, prompt_uses_emphasis, quote_value)

# --- the spec's own examples, verbatim -------------------------------------------------------

SPEC_INFOTEXT = ("a cat\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 1234, "
                 "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1")

SPEC_PARAMETERS = json.loads(
    '{"Steps":"20","Sampler":"Euler","Schedule type":"Automatic","CFG scale":"7.0","Seed":"1234","Size-1":"512",'
    '"Size-2":"512","Model hash":"6ce0161689","Model":"v1-5-pruned-emaonly","Version":"v1.10.1","Prompt":"a cat",'
    '"Negative prompt":"","Clip skip":"1","Hires resize-1":0,"Hires resize-2":0,"Hires sampler":"Use same sampler",'
    '"Hires schedule type":"Use same scheduler","Hires checkpoint":"Use same checkpoint","Hires prompt":"",'
    '"Hires negative prompt":"","Mask mode":"Inpaint masked","Masked content":"original",'
    '"Inpaint area":"Whole picture","Masked area padding":32,"RNG":"GPU","Schedule max sigma":0,'
    '"Schedule min sigma":0,"Schedule rho":0,"VAE Encoder":"Full","VAE Decoder":"Full","FP8 weight":"Disable",'
    '"Refiner switch by sampling steps":false}')

SPEC_INFO = (
    '{"prompt":"a cat","all_prompts":["a cat"],"negative_prompt":"","all_negative_prompts":[""],"seed":1234,'
    '"all_seeds":[1234],"subseed":99,"all_subseeds":[99],"subseed_strength":0,"width":512,"height":512,'
    '"sampler_name":"Euler","cfg_scale":7.0,"steps":20,"batch_size":1,"restore_faces":false,'
    '"face_restoration_model":null,"sd_model_name":"v1-5-pruned-emaonly","sd_model_hash":"6ce0161689",'
    '"sd_vae_name":null,"sd_vae_hash":null,"seed_resize_from_w":-1,"seed_resize_from_h":-1,'
    '"denoising_strength":null,"extra_generation_params":{},"index_of_first_image":0,"infotexts":["a cat\\nSteps: '
    '20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 1234, Size: 512x512, Model hash: '
    '6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"],"styles":[],"job_timestamp":"20240801120000",'
    '"clip_skip":1,"is_using_inpainting_conditioning":false,"version":"v1.10.1"}')


def spec_params(**overrides):
    params = {"Steps": 20, "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1234,
              "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "Version": "v1.10.1"}
    params.update(overrides)
    return params


def test_spec_infotext_reproduced_exactly():
    assert create_infotext("a cat", "", spec_params()) == SPEC_INFOTEXT


def test_spec_parameters_reproduced_exactly_including_order_and_types():
    parsed = parse_generation_parameters(SPEC_INFOTEXT)
    assert list(parsed.items()) == list(SPEC_PARAMETERS.items())
    assert json.dumps(parsed) == json.dumps(SPEC_PARAMETERS)  # 32 stays int, false stays bool


def test_spec_info_json_reproduced_with_key_order():
    text = info_json(prompt="a cat", negative_prompt="", seed=1234, subseed=99, subseed_strength=0, width=512,
                     height=512, sampler_name="Euler", cfg_scale=7.0, steps=20, infotexts=[SPEC_INFOTEXT],
                     sd_model_name="v1-5-pruned-emaonly", sd_model_hash="6ce0161689",
                     job_timestamp="20240801120000", version="v1.10.1")
    assert isinstance(text, str)
    decoded, expected = json.loads(text), json.loads(SPEC_INFO)
    assert decoded == expected
    assert list(decoded) == list(expected)


def test_info_json_lists_defaults_and_unserializable_values():
    decoded = json.loads(info_json(prompt="p", negative_prompt="n", seed=5, subseed=6, subseed_strength=0.5,
                                   width=64, height=64, sampler_name="Euler a", cfg_scale=7.0, steps=2,
                                   infotexts=["x", "y"], all_seeds=[5, 6], batch_size=2,
                                   extra_generation_params={"Schedule type": "Karras", "odd": object()}))
    assert decoded["all_prompts"] == ["p"] and decoded["all_negative_prompts"] == ["n"]
    assert decoded["all_seeds"] == [5, 6] and decoded["all_subseeds"] == [6]
    assert decoded["extra_generation_params"] == {"Schedule type": "Karras", "odd": None}
    assert decoded["version"] == SDFC_VERSION
    assert len(decoded["job_timestamp"]) == 14 and decoded["job_timestamp"].isdigit()


# --- writing ------------------------------------------------------------------------------------

BASE = {"Steps": 20, "Sampler": "Euler", "CFG scale": 7.0, "Seed": 1}
BASE_LINE = "Steps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1"


@pytest.mark.parametrize("prompt, negative, params, expected", [
    pytest.param("a cat, best quality: 1", "", BASE, f"a cat, best quality: 1\n{BASE_LINE}",
                 id="prompt-commas-colons-not-quoted"),
    pytest.param('say "hi"\nsecond line', "ugly, blurry\nlow: quality", BASE,
                 f'say "hi"\nsecond line\nNegative prompt: ugly, blurry\nlow: quality\n{BASE_LINE}',
                 id="multiline-prompt-and-negative"),
    pytest.param("猫, かわいい", "醜い, ぼやけた", BASE, f"猫, かわいい\nNegative prompt: 醜い, ぼやけた\n{BASE_LINE}",
                 id="non-latin1"),
    pytest.param("a", None, BASE, f"a\n{BASE_LINE}", id="none-negative-omitted"),
    pytest.param("", "", BASE, BASE_LINE, id="empty-prompt-stripped"),
    pytest.param("  a cat  ", "", {}, "a cat", id="no-params-stripped"),
    pytest.param("a", "", {"Lora hashes": "foo: abc123, bar: def456", **BASE},
                 f'a\n{BASE_LINE}, Lora hashes: "foo: abc123, bar: def456"', id="lora-hashes-quoted"),
    pytest.param("a", "", {**BASE, "Hires prompt": 'line1\nline "2"'},
                 f'a\n{BASE_LINE}, Hires prompt: "line1\\nline \\"2\\""', id="newline-and-quotes-json-escaped"),
    pytest.param("a", "", {**BASE, "Hires prompt": "猫: 1, 犬"}, f'a\n{BASE_LINE}, Hires prompt: "猫: 1, 犬"',
                 id="non-ascii-kept-in-quotes"),
    pytest.param("a", "", {**BASE, "Hires prompt": 'say "hi"'}, f'a\n{BASE_LINE}, Hires prompt: say "hi"',
                 id="quotes-alone-not-quoted"),
    pytest.param("a", "", {**BASE, "Pad conds": "Pad conds", "Tiling": "True"},
                 f"a\n{BASE_LINE}, Tiling: True, Pad conds", id="value-equals-key-bare"),
    pytest.param("a", "", {**BASE, "Clip skip": None, "ENSD": None, "Eta": None}, f"a\n{BASE_LINE}",
                 id="none-values-omitted"),
    pytest.param("a", "", {**BASE, "Variation seed": 7, "Variation seed strength": 0.25, "Seed resize from": "64x32",
                           "Denoising strength": 0.75, "Clip skip": 2, "ENSD": 31337, "RNG": "CPU", "Eta": 0.5},
                 f"a\n{BASE_LINE}, Variation seed: 7, Variation seed strength: 0.25, Seed resize from: 64x32, "
                 "Denoising strength: 0.75, Clip skip: 2, ENSD: 31337, RNG: CPU, Eta: 0.5",
                 id="optional-fixed-keys"),
])
def test_create_infotext(prompt, negative, params, expected):
    assert create_infotext(prompt, negative, params) == expected


def test_fixed_order_wins_over_insertion_order():
    scrambled = {"User": "me", "Version": "v", "Eta": 0.1, "Seed": 3, "Model": "m", "Steps": 4, "Sampler": "Euler",
                 "Size": "8x8", "Lora hashes": "x", "Clip skip": 2, "CFG scale": 5}
    line = create_infotext("p", "", scrambled).split("\n")[1]
    assert line == ("Steps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 8x8, Model: m, Clip skip: 2, "
                    "Eta: 0.1, Lora hashes: x, Version: v, User: me")


def test_extra_params_keep_fixed_position_and_take_extra_value():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Seed": 1, "Version": "v"}
    extra = {"Hires upscale": 2, "Schedule type": "Karras", "Denoising strength": 0.5, "Hires steps": 10}
    line = create_infotext("p", "", params, extra).split("\n")[1]
    assert line == ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1, Denoising strength: 0.5, "
                    "Hires upscale: 2, Hires steps: 10, Version: v")
    line = create_infotext("p", "", {**params, "Schedule type": "Automatic"}, {"Schedule type": "Karras"})
    assert "Schedule type: Karras" in line and "Automatic" not in line


def test_key_order_constant_matches_spec():
    assert INFOTEXT_KEY_ORDER[:6] == ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed")
    assert INFOTEXT_KEY_ORDER[-3:] == ("Init image hash", "RNG", "Tiling")
    assert len(INFOTEXT_KEY_ORDER) == len(set(INFOTEXT_KEY_ORDER)) == 26


@pytest.mark.parametrize("value, expected", [
    (7.0, "7.0"), (20, "20"), ("plain", "plain"), ("a,b", '"a,b"'), ("a:b", '"a:b"'), ("a\nb", '"a\\nb"'),
    ("é, ü", '"é, ü"'), (("x", 1), '"(\'x\', 1)"'),  # non-strings are quoted via their str()
])
def test_quote_value(value, expected):
    assert quote_value(value) == expected


# --- parsing ------------------------------------------------------------------------------------

def test_parse_a1111_sample_with_quoted_lora_hashes_and_multiline_negative():
    text = ("masterpiece, 1girl, (smile:1.2)\nsecond prompt line\n"
            "Negative prompt: lowres, bad anatomy\nNegative prompt: still negative\n  worst quality  \n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 832x1216, "
            "Model hash: abcdef1234, Model: animeModel_v3, Denoising strength: 0.4, Clip skip: 2, "
            'Hires upscale: 1.5, Hires upscaler: R-ESRGAN 4x+, Lora hashes: "foo: abc123, bar: def456", '
            'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1')
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == "masterpiece, 1girl, (smile:1.2)\nsecond prompt line"
    assert parsed["Negative prompt"] == "lowres, bad anatomy\nstill negative\nworst quality"
    assert parsed["Lora hashes"] == "foo: abc123, bar: def456"
    assert parsed["TI hashes"] == "easynegative: c74b4e810b03"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("832", "1216") and "Size" not in parsed
    assert parsed["Clip skip"] == "2" and parsed["Schedule type"] == "Karras"
    assert parsed["Emphasis"] == "Original"
    assert all(isinstance(parsed[k], str) for k in ("Steps", "CFG scale", "Seed", "Denoising strength"))


@pytest.mark.parametrize("text, prompt, negative, absent", [
    pytest.param("a cat\nSteps: 20, Sampler: Euler", "a cat\nSteps: 20, Sampler: Euler", "", "Steps",
                 id="two-pairs-is-prompt"),
    pytest.param("Steps: 20, Sampler: Euler", "Steps: 20, Sampler: Euler", "", "Steps", id="single-short-line"),
    pytest.param("just a prompt", "just a prompt", "", "Steps", id="no-params"),
    pytest.param("", "", "", "Steps", id="empty"),
    pytest.param("a\nNegative prompt: b\nc: 1, d: 2", "a", "b\nc: 1, d: 2", "c", id="short-line-joins-negative"),
    pytest.param("\n\n  a  \n\nb\nSteps: 1, Seed: 2, CFG scale: 3", "a\n\nb", "", "Size-1",
                 id="lines-stripped-leading-blank-dropped"),
])
def test_parse_prompt_splitting(text, prompt, negative, absent):
    parsed = parse_generation_parameters(text)
    assert (parsed["Prompt"], parsed["Negative prompt"]) == (prompt, negative)
    assert absent not in parsed


@pytest.mark.parametrize("line, expected", [
    ("Steps: 20, Seed: 1, Size: 512x768", {"Steps": "20", "Seed": "1", "Size-1": "512", "Size-2": "768"}),
    ("Steps: 20, Seed: 1, Hires resize: 1024x1024", {"Hires resize-1": "1024", "Hires resize-2": "1024"}),
    ("Steps: 20, Seed: 1, Seed resize from: -1x-1", {"Seed resize from": "-1x-1"}),  # not \d+x\d+
    ('Steps: 20, Seed: 1, Size: "64x32"', {"Size-1": "64", "Size-2": "32"}),  # checked after un-JSON
    ('Steps: 20, Seed: 1, Note: "broken \\q json"', {"Note": '"broken \\q json"'}),  # bad JSON kept raw
    ('Steps: 20, Seed: 1, Empty: "", Blank: , Last: x', {"Empty": "", "Last": "x"}),  # blank value dropped
    ("Steps: 20 , Seed:1,CFG scale: 7", {"Steps": "20 ", "Seed": "1", "CFG scale": "7"}),
    ("Steps: 20, Seed: 1, Face restoration: CodeFormer, Tiling: True",
     {"Face restoration": "CodeFormer", "Tiling": "True"}),
    ("Steps: 1, Steps: 2, Seed: 1", {"Steps": "2"}),  # the last duplicate wins
])
def test_parse_values(line, expected):
    parsed = parse_generation_parameters("p\n" + line)
    for key, value in expected.items():
        assert parsed[key] == value, key
    assert "Blank" not in parsed


def test_parsed_defaults_do_not_override_parsed_values():
    parsed = parse_generation_parameters("p\nSteps: 2, RNG: CPU, Clip skip: 2, Masked area padding: 4, "
                                         "Schedule type: Karras, FP8 weight: Enable")
    assert (parsed["RNG"], parsed["Clip skip"], parsed["Masked area padding"]) == ("CPU", "2", "4")
    assert (parsed["Schedule type"], parsed["FP8 weight"]) == ("Karras", "Enable")


@pytest.mark.parametrize("prompt, negative, expected", [
    ("a cat", "", False),
    ("(a cat)", "", True),
    ("a [cat]", "", True),
    ("", "(ugly:1.3)", True),
    ("(cat:1.0)", "", False),
    ("(cat:1)", "", False),
    (r"\(cat\) \[dog\]", "", False),
    ("()", "", False),
    ("(unclosed", "", True),
    ("[a:b:5]", "", True),  # prompt editing reads as de-emphasis to the attention parser
    ("a BREAK b", "", False),
    ("(BREAK)", "", True),
    ("a: b", "", False),
    ("(a:1.2.3)", "", True),
    ("[(cat)]", "", False),  # 1.1 * (1/1.1) == 1.0 exactly: the weights cancel
    ("[[(cat)]]", "", True),
])
def test_emphasis_detection(prompt, negative, expected):
    assert prompt_uses_emphasis(prompt, negative) is expected
    parsed = parse_generation_parameters(f"{prompt}\nNegative prompt: {negative}\nSteps: 1, Seed: 2, CFG scale: 3")
    assert ("Emphasis" in parsed) is expected


def test_explicit_emphasis_is_kept():
    parsed = parse_generation_parameters("(a)\nSteps: 1, Seed: 2, Emphasis: No norm")
    assert parsed["Emphasis"] == "No norm"


FLAGS = ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod")


@pytest.mark.parametrize("version, prompt, extra, expected", [
    ("v1.10.1", "[a:b:3]", "Sampler: DDIM", set()),
    (SDFC_VERSION, "[a:b:3]", "Sampler: DDIM", set()),
    ("sdfc-0.1.0", "[a:b:3]", "Sampler: DDIM", set()),  # unparseable: no flags
    ("v1.7.0-225-g12345678", "a", "Sampler: Euler", set()),
    ("v1.7.0-224-g12345678", "a", "Sampler: Euler", {"Downcast alphas_cumprod"}),
    ("v1.6.0", "[a:b:3]", "Sampler: DDIM", {"Downcast alphas_cumprod"}),
    ("v1.5.2", "[a:b:3]", "Sampler: DDIM", set(FLAGS)),
    ("v1.5.2", "a", "Sampler: PLMS", {"Pad conds v0", "Downcast alphas_cumprod"}),
    ("1.6.0-RC", "[x]", "Sampler: Euler", {"Old prompt editing timelines", "Downcast alphas_cumprod"}),
])
def test_version_backcompat_flags(version, prompt, extra, expected):
    parsed = parse_generation_parameters(f"{prompt}\nSteps: 20, {extra}, Seed: 1, Version: {version}")
    assert {flag for flag in FLAGS if parsed.get(flag) is True} == expected


def test_refiner_flag_for_old_versions_only():
    text = "p\nSteps: 2, Seed: 1, Refiner: sdxl_refiner [7440042bbd], Version: {}"
    assert parse_generation_parameters(text.format("v1.7.0"))["Refiner switch by sampling steps"] is True
    assert parse_generation_parameters(text.format("v1.8.0"))["Refiner switch by sampling steps"] is False


def test_parse_version_orders_like_packaging():
    version = pytest.importorskip("packaging.version")
    samples = ["1.5.2", "v1.6.0-RC", "1.6.0", "v1.7.0", "v1.7.0-224", "v1.7.0-225", "1.8.0", "v1.10.1",
               SDFC_VERSION, "1.10.0-pre", "1.2", "2.0.0rc1", "2.0.0"]
    ours = sorted(samples, key=parse_version)
    theirs = sorted(samples, key=version.parse)
    assert ours == theirs
    for bad in ("sdfc-0.1.0", "v1.10.1-sdfc", "f2.0.1v1.10.1-previous", "", None):
        assert parse_version(bad) is None


@pytest.mark.parametrize("prompt, negative", [
    ("a cat, (best quality:1.2), [blurry]", "ugly, bad: hands"),
    ('quotes "inside", and a backslash \\ here', 'neg "quoted"'),
    ("line one\nline two: with colon\nSteps: 1, Seed: 2", "neg one\nneg two"),  # a fake param line in the prompt
    ("猫, かわいい\n日本語の行", "醜い, ぼやけた\n二行目"),
    ("emoji 🐱, ünïcödé", ""),
    ("", "only a negative"),
])
def test_round_trip_create_then_parse(prompt, negative):
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 4242,
              "Size": "512x768", "Model hash": "6ce0161689", "Model": "my, model: v2", "Clip skip": 2,
              "Eta": 0.5, "Hires prompt": 'a\nb, "c"', "Lora hashes": "foo: abc123, bar: def456",
              "Version": SDFC_VERSION}
    parsed = parse_generation_parameters(create_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    for key, value in params.items():
        if key != "Size":
            assert parsed[key] == str(value), key
    assert "Downcast alphas_cumprod" not in parsed


@pytest.mark.parametrize("text", ['"', 'a\n"', ":::\n, , ,", "x: \"\\", "\n\n\n", "Negative prompt:", "((((", "]]]))",
                                  'p\nA: "x, B: 1, C: 2', "\x00\ud800"])
def test_parse_never_raises(text):
    parsed = parse_generation_parameters(text)
    assert "Prompt" in parsed and "Negative prompt" in parsed
