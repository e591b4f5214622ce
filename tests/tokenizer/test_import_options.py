"""Import options beyond the layouts: the format's signature is checked, VQGAN-LC's separate codebook file,
and architectures the imported layouts cannot build."""

import pytest
import torch

from snce.config import ConfigError
from snce.tokenizer import Tokenizer, TokenizerConfig
from snce.tokenizer.formats import CheckpointKeyError, export_state, import_tokenizer

SMALL = dict(
    in_channels=3, channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=8,
    architecture="taming", z_channels=32,
)  # fmt: skip


def _lc_tokenizer():
    torch.manual_seed(0)
    cfg = TokenizerConfig(**SMALL, quantizer={"kind": "lc", "codebook_size": 50, "feature_dim": 12})
    tokenizer = Tokenizer(cfg)
    tokenizer.quantizer.init_codebook(torch.randn(400, 12))
    return tokenizer.eval()


def test_a_file_of_another_layout_is_refused_naming_the_layout_it_looks_like(tmp_path):
    tokenizer = Tokenizer(TokenizerConfig(**SMALL, quantizer={"kind": "vq", "codebook_size": 16}))
    torch.save({"state_dict": export_state(tokenizer, "taming")}, tmp_path / "taming.ckpt")
    with pytest.raises(CheckpointKeyError, match=r"no key like .*look like format 'taming'"):
        import_tokenizer(tmp_path / "taming.ckpt", "vqgan-lc")


def test_vqgan_lc_takes_its_code_features_from_a_separate_file(tmp_path):
    tokenizer = _lc_tokenizer()
    state = export_state(tokenizer, "vqgan-lc")
    base = state.pop("tok_embeddings.weight")
    torch.save({"state_dict": state}, tmp_path / "vqgan_lc.pth")
    torch.save(base.clone(), tmp_path / "codebook-100K.pth")

    with pytest.raises(CheckpointKeyError, match="tok_embeddings.weight"):
        import_tokenizer(tmp_path / "vqgan_lc.pth", "vqgan-lc")  # no features anywhere
    imported = import_tokenizer(
        tmp_path / "vqgan_lc.pth", "vqgan-lc", codebook=tmp_path / "codebook-100K.pth"
    )
    assert torch.equal(imported.quantizer.codebook, tokenizer.quantizer.codebook)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(imported.encode(x).indices, tokenizer.encode(x).indices)

    torch.save(base + 1, tmp_path / "other.pth")  # a file that disagrees with the checkpoint's copy
    torch.save({"state_dict": {**state, "tok_embeddings.weight": base}}, tmp_path / "full.pth")
    with pytest.raises(ValueError, match="differs"):
        import_tokenizer(tmp_path / "full.pth", "vqgan-lc", codebook=tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no separate codebook"):
        import_tokenizer(tmp_path / "full.pth", "taming", codebook=tmp_path / "other.pth")


@pytest.mark.parametrize("architecture", ["taming", "maskgit"])
def test_imported_architectures_need_widths_that_32_groups_divide(architecture):
    extra = {"z_channels": 32} if architecture == "taming" else {}
    cfg = TokenizerConfig(
        channels=16, channel_mult=(2, 4), latent_channels=8, architecture=architecture, **extra
    )
    with pytest.raises(ConfigError, match="multiples of 32, got 16"):
        cfg.check()
