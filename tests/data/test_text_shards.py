"""Token shards with text embeddings: round trip, a mismatched text encoder refused, text-free shards unchanged."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch.utils.data import Dataset

from snce.data import ShardManifest, ShardWriter, TokenShards
from snce.text import BuiltinTextEncoder
from snce.tokenizer import Tokenizer, TokenizerConfig, tokenize_dataset

CAPTIONS = [
    "a large red circle on the left",
    "a small blue square at the bottom",
    "a green triangle",
    "a yellow circle on the right and a small red square at the top",
    "",
    "a large blue triangle on the left",
    "a small green circle",
]


def manifest(text_encoder=None) -> ShardManifest:
    return ShardManifest(
        grid=(2, 3), codebook_size=50, metric="l2", codebook_hash="abc123", tokenizer={"channels": 8},
        num_classes=0, text_encoder=ShardManifest.text_entry(text_encoder) if text_encoder else None,
    )  # fmt: skip


def write(directory, encoder, n=7, shard_size=3):
    idx = torch.randint(0, 50, (n, 2, 3))
    emb, mask = encoder.encode(CAPTIONS[:n])
    w = ShardWriter(directory, manifest(encoder), shard_size=shard_size)
    for s in (slice(0, 2), slice(2, 3), slice(3, n)):
        w.add(
            idx[s], torch.zeros(len(CAPTIONS[s]), dtype=torch.long),
            text=emb[s], text_mask=mask[s], texts=CAPTIONS[s],
        )  # fmt: skip
    return w.close(), idx, emb, mask


def test_text_embeddings_round_trip(tmp_path):
    enc = BuiltinTextEncoder(dim=16, max_length=12)
    m, idx, emb, mask = write(tmp_path, enc)
    assert [s["count"] for s in m.shards] == [3, 3, 1] and m.has_text
    assert m.text_encoder == {
        "spec": enc.spec, "fingerprint": enc.fingerprint(), "dim": 16, "max_length": 12,
    }  # fmt: skip
    ds = TokenShards(tmp_path, text_encoder=enc)
    assert ds.manifest == ShardManifest.load(tmp_path)
    assert torch.equal(ds.indices, idx.int())
    assert ds.text.dtype == torch.float16 and torch.equal(ds.text, emb.half())
    assert ds.text_mask.dtype == torch.bool and torch.equal(ds.text_mask, mask)
    assert ds.texts == CAPTIONS
    item = ds[3]
    assert item["text"].dtype == torch.float32 and item["text"].shape == (12, 16)
    torch.testing.assert_close(item["text"], emb[3], atol=2e-3, rtol=1e-3)  # fp16 storage
    assert torch.equal(item["text_mask"], mask[3]) and item["label"] == 0
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["text"].shape == (4, 12, 16) and batch["text_mask"].shape == (4, 12)
    # the stored spec rebuilds the encoder that made them
    from snce.text import build_text_encoder

    ds.manifest.check_text_encoder(build_text_encoder(ds.manifest.text_encoder["spec"]))
    ds.manifest.check_text_encoder(enc.fingerprint())
    lean = TokenShards(tmp_path, load_text=False)
    assert lean.text is None and "text" not in lean[0] and lean.texts == CAPTIONS


@pytest.mark.parametrize(
    "other",
    [BuiltinTextEncoder(dim=16, max_length=12, seed=1), BuiltinTextEncoder(dim=16, max_length=8)],
)
def test_mismatched_text_encoder_is_refused(tmp_path, other):
    enc = BuiltinTextEncoder(dim=16, max_length=12)
    write(tmp_path, enc)
    want, got = enc.fingerprint()[:16], other.fingerprint()[:16]
    message = (
        rf"text encoder {re.escape(str(enc.spec))} \(fingerprint {want}\.\.\.\), but the given text "
        rf"encoder {re.escape(str(other.spec))} has fingerprint {got}"
    )
    with pytest.raises(ValueError, match=message):
        TokenShards(tmp_path, text_encoder=other)
    with pytest.raises(ValueError, match=f"fingerprint {want}.*fingerprint {got}"):
        ShardManifest.load(tmp_path).check_text_encoder(other.fingerprint())


def test_shards_without_text_still_load(tmp_path):
    w = ShardWriter(tmp_path, manifest())
    w.add(torch.ones(2, 2, 3, dtype=torch.long), torch.tensor([1, 2]))
    w.close()
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert "text_encoder" not in on_disk and "edit" not in on_disk  # the manifest they always had
    ds = TokenShards(tmp_path)
    assert not ds.manifest.has_text and ds.text is None and ds.texts is None
    assert set(ds[0]) == {"indices", "label"}
    with pytest.raises(ValueError, match="hold no text embeddings"):
        TokenShards(tmp_path, text_encoder=BuiltinTextEncoder())


def test_writer_checks_text(tmp_path):
    enc = BuiltinTextEncoder(dim=8, max_length=4)
    emb, mask = enc.encode(["red", "blue"])
    idx, labels = torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="need a manifest with a text_encoder"):
        ShardWriter(tmp_path / "a", manifest()).add(
            idx, labels, text=emb, text_mask=mask, texts=["r", "b"]
        )
    w = ShardWriter(tmp_path / "b", manifest(enc))
    with pytest.raises(ValueError, match="must be given"):
        w.add(idx, labels)
    with pytest.raises(ValueError, match=r"text must be \(2, 4, 8\)"):
        w.add(idx, labels, text=emb[:, :3], text_mask=mask[:, :3], texts=["r", "b"])
    with pytest.raises(ValueError, match="must be bool"):
        w.add(idx, labels, text=emb, text_mask=mask.long(), texts=["r", "b"])
    with pytest.raises(ValueError, match="2 strings"):
        w.add(idx, labels, text=emb, text_mask=mask, texts=["r"])


class Captioned(Dataset):
    """(image, caption, attributes) items, like the scenes datasets."""

    def __init__(self, n=5):
        self.images = torch.rand(n, 1, 8, 8) * 2 - 1
        self.captions = CAPTIONS[:n]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.captions[i], torch.tensor([i, 0])


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(
        TokenizerConfig(in_channels=1, channels=8, channel_mult=(1, 2), latent_channels=4,
                        quantizer={"kind": "vq", "codebook_size": 16})
    ).eval()  # fmt: skip


def test_tokenize_stores_text_embeddings(tmp_path):
    tok, data, enc = tiny_tokenizer(), Captioned(), BuiltinTextEncoder(dim=8, max_length=10)
    m = tokenize_dataset(
        tok,
        data,
        tmp_path,
        batch_size=2,
        shard_size=3,
        progress=False,
        device="cpu",
        text_encoder=enc,
    )
    assert m.text_encoder["fingerprint"] == enc.fingerprint() and m.num_samples == 5
    ds = TokenShards(tmp_path, text_encoder=enc)
    emb, mask = enc.encode(data.captions)
    assert torch.equal(ds.text, emb.half()) and torch.equal(ds.text_mask, mask)
    assert ds.texts == data.captions and ds.labels.eq(0).all()
    with torch.no_grad():
        assert torch.equal(ds.indices.long(), tok.encode(data.images).indices)
    with pytest.raises(ValueError, match="carry texts.*--text-encoder"):
        tokenize_dataset(tok, data, tmp_path / "x", progress=False, device="cpu")
    digits = torch.utils.data.TensorDataset(data.images, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="carry no texts"):
        tokenize_dataset(
            tok, digits, tmp_path / "y", progress=False, device="cpu", text_encoder=enc
        )


def test_cli_tokenize_takes_a_text_encoder(tmp_path, capsys):
    from snce.cli import main

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    args = ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")]
    args += ["--set", "data.name=digits", "--set", "data.size=8", "--device", "cpu"]
    assert main([*args, "--text-encoder", "t5"]) == 2
    assert "'builtin', 'hf:DIR' or a JSON object" in capsys.readouterr().err
    assert (
        main([*args, "--text-encoder", '{"kind": "builtin", "dim": 8}']) == 2
    )  # digits: no captions
    assert "carry no texts" in capsys.readouterr().err


class Edits(Dataset):
    """Editing triples as dicts, like the scenes' SceneEdits."""

    def __init__(self, n=5):
        self.sources, self.targets = torch.rand(2, n, 1, 8, 8) * 2 - 1
        self.instructions = ["make the circle green", "move the square left", "", "a", "b"][:n]

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        return {
            "source": self.sources[i], "instruction": self.instructions[i], "target": self.targets[i],
            "edit": {"kind": "recolour", "object": 0},
        }  # fmt: skip


def test_tokenize_stores_editing_triples(tmp_path):
    tok, data, enc = tiny_tokenizer(), Edits(), BuiltinTextEncoder(dim=8, max_length=6)
    m = tokenize_dataset(
        tok,
        data,
        tmp_path,
        batch_size=2,
        shard_size=3,
        progress=False,
        device="cpu",
        text_encoder=enc,
    )
    assert m.edit and m.has_text and json.loads((tmp_path / "manifest.json").read_text())["edit"]
    ds = TokenShards(tmp_path, text_encoder=enc)
    with torch.no_grad():
        assert torch.equal(ds.indices.long(), tok.encode(data.targets).indices)
        assert torch.equal(ds.source.long(), tok.encode(data.sources).indices)
    assert ds.texts == data.instructions
    assert torch.equal(ds.text_mask, enc.encode(data.instructions)[1])
    assert torch.equal(ds[4]["source"], ds.source[4].reshape(-1).long())
    idx = torch.zeros(1, 2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="source must be given exactly when"):
        ShardWriter(tmp_path / "c", manifest()).add(idx, torch.zeros(1), source=idx)
