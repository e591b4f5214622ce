"""Text encoders: the builtin weightless encoder, the local Hugging Face adapter, specs and their errors."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch

from snce.text import (
    BuiltinTextEncoder,
    HFTextEncoder,
    TextEncoder,
    build_text_encoder,
    parse_text_encoder,
)

SCENE_WORDS = (
    "circle square triangle red green blue yellow small large left right top bottom "
    "a an the and on at in of make move"
).split()

# ----------------------------------------------------------------------------------------------- builtin


def test_builtin_is_deterministic_and_pinned():
    a, b = BuiltinTextEncoder(), BuiltinTextEncoder()
    texts = ["a large red circle on the left", "make the square green", ""]
    ea, ma = a.encode(texts)
    eb, mb = b.encode(texts)
    assert isinstance(a, TextEncoder)
    assert ea.dtype == torch.float32 and ma.dtype == torch.bool
    assert ea.shape == (3, 32, 64) and ma.shape == (3, 32)
    assert torch.equal(ea, eb) and torch.equal(ma, mb)
    assert a.fingerprint() == b.fingerprint()
    # the same on every machine and torch version: shards made elsewhere must be accepted here
    assert a.fingerprint() == "fa6050054e9d391fdf9599dfb150cb878bbaa3f66216365f9b8a6c76d1a193e0"


def test_builtin_distinguishes_every_scene_word():
    enc = BuiltinTextEncoder(dim=32)
    emb, mask = enc.encode(SCENE_WORDS)
    first = emb[:, 0]  # (W, E): each word at position 0
    assert mask.sum(1).eq(2).all()  # the word and the end token
    for i, j in itertools.combinations(range(len(SCENE_WORDS)), 2):
        assert (first[i] - first[j]).norm() > 1.0, (SCENE_WORDS[i], SCENE_WORDS[j])
    # case and punctuation do not matter
    assert torch.equal(enc.encode(["A Red, circle!"])[0], enc.encode(["a red circle"])[0])


def test_builtin_distinguishes_order():
    enc = BuiltinTextEncoder()
    pairs = [
        ("a red circle and a blue square", "a blue circle and a red square"),
        ("move the square left", "move the left square"),
        ("circle red", "red circle"),
    ]
    for x, y in pairs:
        ex, mx = enc.encode([x])
        ey, my = enc.encode([y])
        assert torch.equal(mx, my)
        assert not torch.allclose(ex, ey), (x, y)
        # same bag of words, so only position tells them apart: the sums over tokens agree
        torch.testing.assert_close(ex.sum(1), ey.sum(1))


def test_builtin_mask_marks_padding_and_truncates():
    enc = BuiltinTextEncoder(dim=8, max_length=5)
    emb, mask = enc.encode(["red", "", "one two three four five six seven"])
    assert mask.tolist() == [
        [True, True, False, False, False],
        [True, False, False, False, False],  # "" still has its end token
        [True, True, True, True, True],  # four words + end token
    ]
    assert emb[~mask].abs().max() == 0 and emb[mask].abs().min() > 0
    # padding changes nothing about the real tokens
    long = BuiltinTextEncoder(dim=8, max_length=9)
    torch.testing.assert_close(long.encode(["red"])[0][:, :5], emb[:1])
    assert enc.encode([])[0].shape == (0, 5, 8)


def test_builtin_fingerprint_changes_with_settings():
    base = BuiltinTextEncoder().fingerprint()
    others = [
        BuiltinTextEncoder(dim=32),
        BuiltinTextEncoder(max_length=16),
        BuiltinTextEncoder(seed=1),
    ]
    prints = {base, *(e.fingerprint() for e in others)}
    assert len(prints) == 4
    assert not torch.equal(
        BuiltinTextEncoder(seed=1).encode(["red"])[0], BuiltinTextEncoder().encode(["red"])[0]
    )


def test_builtin_rejects_bad_options_and_inputs():
    for kwargs, name in (
        ({"dim": 7}, "dim"),
        ({"dim": 0}, "dim"),
        ({"max_length": 0}, "max_length"),
    ):
        with pytest.raises(ValueError, match=name):
            BuiltinTextEncoder(**kwargs)
    with pytest.raises(TypeError, match="list of strings"):
        BuiltinTextEncoder().encode("a red circle")
    with pytest.raises(TypeError, match="strings"):
        BuiltinTextEncoder().encode(["ok", 3])


# ------------------------------------------------------------------------------------------------ specs


def test_specs_build_and_round_trip():
    enc = build_text_encoder({"kind": "builtin", "dim": 16, "max_length": 8, "seed": 3})
    assert (enc.dim, enc.max_length, enc.seed) == (16, 8, 3)
    again = build_text_encoder(json.loads(json.dumps(enc.spec)))  # what shards store
    assert again.fingerprint() == enc.fingerprint()
    assert build_text_encoder("builtin").spec == BuiltinTextEncoder().spec
    assert parse_text_encoder("hf:/models/t5") == {"kind": "hf", "path": "/models/t5"}
    assert parse_text_encoder('{"kind": "builtin", "dim": 8}') == {"kind": "builtin", "dim": 8}


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ({"kind": "clip"}, ValueError, "kind must be one of"),
        ({"kind": "builtin", "width": 3}, ValueError, r"unknown option\(s\) \['width'\]"),
        ({"kind": "hf"}, ValueError, "needs 'path'"),
        ("t5", ValueError, "'builtin', 'hf:DIR' or a JSON object"),
        ("{not json", ValueError, "not valid JSON"),
        (["builtin"], TypeError, "dict or str"),
    ],
)
def test_spec_errors(spec, error, message):
    with pytest.raises(error, match=message):
        build_text_encoder(spec)


# ------------------------------------------------------------------------------------------ Hugging Face

WORDS = ["<pad>", "</s>", "<unk>", *SCENE_WORDS]


def _word_level_tokenizer():
    """A tiny word-level fast tokenizer built offline (nothing downloaded): lower-cases, splits on whitespace
    and punctuation, appends </s> like T5's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", WORDS.index("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny_t5")
    _tiny_t5().save_pretrained(directory)
    _word_level_tokenizer().save_pretrained(directory)
    return directory


def test_hf_t5_encoder_loads_from_a_saved_directory(t5_dir):
    from transformers import T5EncoderModel

    enc = build_text_encoder({"kind": "hf", "path": str(t5_dir), "max_length": 10})
    assert isinstance(enc, HFTextEncoder) and type(enc.model).__name__ == "T5EncoderModel"
    assert (enc.dim, enc.max_length) == (16, 10)
    texts = ["a large red circle on the left", "make the square green"]
    emb, mask = enc.encode(texts)
    assert emb.shape == (2, 10, 16) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 5]  # words + </s>
    assert emb[~mask].abs().max() == 0
    # the adapter returns the model's own last_hidden_state at the real tokens
    ids = torch.tensor([[WORDS.index(w) for w in "make the square green".split()] + [1]])
    ref = T5EncoderModel.from_pretrained(t5_dir).eval()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb[1, :5], ref[0], atol=1e-5, rtol=1e-5)
    # padding to a longer max_length changes nothing at the real tokens
    longer = build_text_encoder({"kind": "hf", "path": str(t5_dir), "max_length": 16})
    torch.testing.assert_close(longer.encode(texts)[0][:, :10], emb, atol=1e-5, rtol=1e-5)
    # spec round trip (shards store it)
    assert build_text_encoder(enc.spec).fingerprint() == enc.fingerprint()


def test_hf_fingerprint_tracks_weights_vocabulary_and_length(t5_dir, tmp_path):
    enc = build_text_encoder({"kind": "hf", "path": str(t5_dir), "max_length": 10})
    assert (
        build_text_encoder(f"hf:{t5_dir}").max_length == 128
    )  # the default when nothing limits it
    assert HFTextEncoder(t5_dir, max_length=10).fingerprint() == enc.fingerprint()
    assert HFTextEncoder(t5_dir, max_length=12).fingerprint() != enc.fingerprint()
    other = tmp_path / "other"
    _tiny_t5(seed=1).save_pretrained(other)  # other weights
    _word_level_tokenizer().save_pretrained(other)
    assert HFTextEncoder(other, max_length=10).fingerprint() != enc.fingerprint()


def test_hf_clip_text_model_loads(t5_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=12, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    CLIPTextModel(config).save_pretrained(tmp_path)
    _word_level_tokenizer().save_pretrained(tmp_path)
    enc = build_text_encoder(f"hf:{tmp_path}")
    assert type(enc.model).__name__ == "CLIPTextModel"
    assert enc.max_length == 12  # capped by the position table
    emb, mask = enc.encode(["a small blue triangle"])
    assert emb.shape == (1, 12, 16) and mask.sum() == 5


def test_hf_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*downloads nothing"):
        build_text_encoder({"kind": "hf", "path": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder("hf:google/flan-t5-base")  # a hub id is not a local directory
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_text_encoder({"kind": "hf", "path": str(tmp_path)})


def test_hf_without_transformers_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"needs the `transformers` package.*snce\[text\]"):
        build_text_encoder({"kind": "hf", "path": str(tmp_path)})
