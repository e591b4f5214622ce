"""Token shards: write, reload to the same tensors, manifest checks."""

from __future__ import annotations

import pytest
import torch

from snce.data import ShardManifest, ShardWriter, TokenShards


def manifest(latent_dim=3, codebook_hash="abc123") -> ShardManifest:
    return ShardManifest(
        grid=(2, 3),
        codebook_size=50,
        metric="l2",
        codebook_hash=codebook_hash,
        tokenizer={"channels": 8},
        num_classes=4,
        latent_dim=latent_dim,
    )


def test_shards_reload_to_the_same_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (11, 2, 3), generator=g)
    labels = torch.randint(0, 4, (11,), generator=g)
    lat = torch.randn(11, 2, 3, 3, generator=g)
    w = ShardWriter(tmp_path, manifest(), shard_size=4)
    for s in (slice(0, 5), slice(5, 6), slice(6, 11)):
        w.add(idx[s], labels[s], lat[s])
    m = w.close()
    assert [s["count"] for s in m.shards] == [4, 4, 3] and m.num_samples == 11
    ds = TokenShards(tmp_path)
    assert ds.manifest == ShardManifest.load(tmp_path) and ds.manifest.grid == (2, 3)
    assert torch.equal(ds.indices, idx.int()) and torch.equal(ds.labels, labels)
    assert torch.equal(ds.latents, lat.half())
    item = ds[7]
    assert torch.equal(item["indices"], idx[7].reshape(6)) and item["label"] == labels[7]
    assert torch.equal(item["latents"], lat[7].half().float().reshape(6, 3))
    assert "latents" not in TokenShards(tmp_path, load_latents=False)[0]


def test_manifest_rejects_another_tokenizer(tmp_path):
    class Tok:
        def __init__(self, h):
            self.h = h

        def codebook_hash(self):
            return self.h

    w = ShardWriter(tmp_path, manifest(latent_dim=None))
    w.add(torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    m = w.close()
    m.check_tokenizer(Tok("abc123"))
    with pytest.raises(ValueError, match="codebook hash abc123.*hashes to zzz"):
        m.check_tokenizer(Tok("zzz"))


def test_writer_checks_shapes_and_never_overwrites(tmp_path):
    w = ShardWriter(tmp_path, manifest(latent_dim=None))
    with pytest.raises(ValueError, match=r"indices must be \(B, 2, 3\)"):
        w.add(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="latents must be given exactly"):
        w.add(torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(2), torch.zeros(2, 2, 3, 1))
    w.add(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    w.close()
    with pytest.raises(FileExistsError, match="--overwrite"):
        ShardWriter(tmp_path, manifest(latent_dim=None))
    ShardWriter(tmp_path, manifest(latent_dim=None), overwrite=True).close()
    assert len(TokenShards(tmp_path)) == 0
    with pytest.raises(FileNotFoundError, match="not a token shard directory"):
        TokenShards(tmp_path / "nothing")
