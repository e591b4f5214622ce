"""`snce eval` inputs: sample files load back to the images that were saved; real data scores as real."""

import numpy as np
import pytest
import torch
from PIL import Image

from snce.cli import main
from snce.data import DataConfig, Digits
from snce.metrics.samples import evaluate_samples, load_samples


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_npz_and_folder_samples_load_back(tmp_path):
    ds = Digits(16, split="test")
    images = torch.stack([ds[i][0] for i in range(12)])
    pixels = _to_uint8(images)
    np.savez(tmp_path / "s.npz", images=pixels, labels=np.arange(12) % 10)
    loaded, extras = load_samples(tmp_path / "s.npz", size=16, channels=1)
    torch.testing.assert_close(
        loaded, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    )
    assert extras["labels"].tolist() == (np.arange(12) % 10).tolist()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p[..., 0]).save(folder / f"{i:03d}.png")
    from_folder, _ = load_samples(folder, size=16, channels=1)
    torch.testing.assert_close(from_folder, loaded, atol=1e-6, rtol=0)
    # the ADM layout (snce sample --out-dir): RGB arr_0 (grey expanded), labels beside it
    np.savez(tmp_path / "adm.npz", arr_0=pixels.repeat(3, axis=-1), labels=np.arange(12) % 10)
    from_adm, extras = load_samples(tmp_path / "adm.npz", size=16, channels=1)
    torch.testing.assert_close(from_adm, loaded, atol=1e-6, rtol=0)
    assert extras["labels"].tolist() == (np.arange(12) % 10).tolist()


def test_real_held_out_digits_score_as_real(tmp_path):
    """Held-out real digits against the training digits: small FID, the classifier recognises their classes."""
    ds = Digits(16, split="test")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    noise = torch.rand_like(images) * 2 - 1
    kwargs = dict(cache_dir=tmp_path, steps=150, width=16, lr=5e-3)
    real = evaluate_samples(images, DataConfig(name="digits", size=16), labels=labels, **kwargs)
    fake = evaluate_samples(noise, DataConfig(name="digits", size=16), labels=labels, **kwargs)
    assert real["class_acc"] >= 0.85 and real["features"]["features"] == "domain"
    assert real["fid"] < 0.1 * fake["fid"]
    assert real["precision"] > 0.8 and fake["precision"] < 0.05


@pytest.mark.parametrize("bad", ["missing.npz", "notes.txt"])
def test_eval_cli_rejects_unreadable_samples(tmp_path, capsys, bad):
    (tmp_path / "notes.txt").write_text("not images")
    assert main(["eval", "--samples", str(tmp_path / bad), "--cache-dir", str(tmp_path)]) == 2
    assert "samples: expected an .npz file or a folder of images" in capsys.readouterr().err
