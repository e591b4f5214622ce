"""The ADM evaluator's protocol (snce.metrics.adm): each number against an independent computation or a known
answer, the reference-batch layout, the features it reads from Inception, and `snce eval` end to end."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from snce.cli import main
from snce.metrics import adm
from snce.metrics.adm import GaussianStatistics, NpzImages, read_npz, write_reference
from snce.metrics.inception import InceptionV3, resize_299, tf1_resize_bilinear

SCIPY_SQRTM = linalg.sqrtm  # kept before any test swaps it


def _random_inception(seed: int = 0) -> InceptionV3:
    """The real architecture with random weights that keep activations O(1) (He init, random BN statistics)."""
    torch.manual_seed(seed)
    net = InceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        torch.nn.init.normal_(net.fc.weight, std=0.05)
    return net.eval().requires_grad_(False)


def _fid_scipy(x1: np.ndarray, x2: np.ndarray) -> float:
    """Independent float64 FID: np.mean / np.cov and scipy.linalg.sqrtm, written out here."""
    m1, m2 = x1.astype(np.float64).mean(0), x2.astype(np.float64).mean(0)
    s1 = np.cov(x1.astype(np.float64), rowvar=False)
    s2 = np.cov(x2.astype(np.float64), rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


# --------------------------------------------------------------------------------------------- FID


def test_fid_from_statistics_equals_independent_float64_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 24)).astype(np.float32)
    b = (rng.normal(size=(250, 24)) @ rng.normal(size=(24, 24)) * 0.3 + 0.5).astype(np.float32)
    sa, sb = GaussianStatistics.of(a), GaussianStatistics.of(b)
    assert sa.mu.dtype == sa.sigma.dtype == np.float64
    want = _fid_scipy(a, b)
    assert sa.frechet_distance(sb) == pytest.approx(want, rel=1e-10, abs=1e-10)
    assert sb.frechet_distance(sa) == pytest.approx(want, rel=1e-8)
    assert sa.frechet_distance(sa) == pytest.approx(0.0, abs=1e-8)
    # the same number through the symmetric form snce's other FID uses (a different algorithm)
    from snce.metrics.image import FeatureStatistics

    other = FeatureStatistics.of(torch.from_numpy(a))
    x = torch.from_numpy(b).double()
    assert float(other.frechet(x.mean(0), torch.cov(x.T))) == pytest.approx(want, rel=1e-8)


def test_fid_singular_product_adds_eps_like_adm(monkeypatch):
    rng = np.random.default_rng(1)
    sa = GaussianStatistics.of(rng.normal(size=(50, 6)))
    sb = GaussianStatistics.of(rng.normal(size=(50, 6)) + 1)
    real_sqrtm, calls = linalg.sqrtm, []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(adm.linalg, "sqrtm", first_call_fails)
    with pytest.warns(UserWarning, match="adding 1e-06 to both diagonals"):
        fid = sa.frechet_distance(sb)
    offset = np.eye(6) * 1e-6
    np.testing.assert_allclose(calls[1], (sa.sigma + offset) @ (sb.sigma + offset))
    root = real_sqrtm((sa.sigma + offset) @ (sb.sigma + offset)).real
    diff = sa.mu - sb.mu
    want = diff @ diff + np.trace(sa.sigma) + np.trace(sb.sigma) - 2 * np.trace(root)
    assert fid == pytest.approx(want, rel=1e-12)

    monkeypatch.setattr(adm.linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 0.01j))
    with pytest.raises(ValueError, match="imaginary part of 0.01"):
        sa.frechet_distance(sb)


def test_statistics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"mu \(d,\) and sigma \(d, d\)"):
        GaussianStatistics(np.zeros(3), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="different widths"):
        GaussianStatistics(np.zeros(3), np.eye(3)).frechet_distance(
            GaussianStatistics(np.zeros(2), np.eye(2))
        )


# ---------------------------------------------------------------------------------------------- IS


def test_inception_score_matches_a_hand_computation_over_adm_splits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, 7)) * 3
    split = 5  # splits of 5, 5 and 2, in order: ADM's rule
    scores = []
    for start in range(0, 12, split):
        rows = logits[start : start + split]
        probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in rows]
        marginal = [sum(p[c] for p in probs) / len(probs) for c in range(7)]
        kl = [sum(p[c] * (math.log(p[c]) - math.log(marginal[c])) for c in range(7)) for p in probs]
        scores.append(math.exp(sum(kl) / len(kl)))
    want = sum(scores) / len(scores)
    assert adm.inception_score(logits, split_size=split) == pytest.approx(want, rel=1e-12)
    assert adm.is_split_sizes(12, 5) == [5, 5, 2]
    assert adm.is_split_sizes(50000) == [5000] * 10
    # limits: one class for every sample -> 1; each of C classes predicted surely and equally often -> C
    assert adm.inception_score(np.zeros((10, 5))) == pytest.approx(1.0)
    assert adm.inception_score(np.eye(6) * 100.0) == pytest.approx(6.0, rel=1e-9)
    # a probability that underflows to 0 contributes 0 (no nan)
    assert math.isfinite(adm.inception_score(np.eye(4) * 2000.0))


# ------------------------------------------------------------------------------ precision / recall


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_precision_recall_known_answers(dtype):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    b = a + np.float32(10.0)  # a second cluster, far from the first but within float16's range
    kw = dict(distance_dtype=dtype)
    assert adm.precision_recall(a, a.copy(), **kw) == (1.0, 1.0)  # identical sets
    far = a + np.float32(
        1000.0
    )  # squared distances ~ 8e6: float16 overflows, ADM's float32 fallback
    assert adm.precision_recall(a, far, **kw) == (0.0, 0.0)
    # the samples are one of the reference's two clusters: all of them are real, half the reference is covered
    assert adm.precision_recall(np.concatenate([a, b]), a.copy(), **kw) == (1.0, 0.5)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_precision_recall_by_hand_in_one_dimension(dtype):
    """k = 1 on a line. Reference radii (squared distance to the nearest other reference point):
    0 -> 1, 1 -> 1, 10 -> 1, 11 -> 1, 40 -> 29^2 = 841. Sample radii: 0.5 -> 4.5^2, 5 -> 4.5^2,
    10.5 -> 5.5^2, 20 -> 9.5^2. Precision: 0.5 (in the ball of 0), 10.5 (of 10) and 20 (20^2 = 400 <= 841 in
    the ball of 40) -> 3/4. Recall: 0, 1, 10, 11 lie in the balls of 0.5 and 10.5; 40 lies in none -> 4/5."""
    ref = np.array([[0.0], [1.0], [10.0], [11.0], [40.0]], dtype=np.float32)
    fake = np.array([[0.5], [5.0], [10.5], [20.0]], dtype=np.float32)
    radii = adm.manifold_radii(ref, k=1, distance_dtype=dtype)
    torch.testing.assert_close(radii, torch.tensor([1.0, 1.0, 1.0, 1.0, 841.0]))
    assert adm.precision_recall(ref, fake, k=1, distance_dtype=dtype) == (0.75, 0.8)
    # k = 3: the 3rd nearest *other* member; for 0 the others are at 1, 3, 6, 10 -> 6^2, for 3 at 2, 3, 3, 7 -> 3^2
    line = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], dtype=np.float32)
    torch.testing.assert_close(
        adm.manifold_radii(line, k=3, distance_dtype=dtype),
        torch.tensor([36.0, 25.0, 9.0, 25.0, 81.0]),
    )


def test_precision_recall_blocks_do_not_change_the_answer():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 16)).astype(np.float32)
    fake = (rng.normal(size=(29, 16)) + 1.0).astype(np.float32)
    whole = adm.precision_recall(ref, fake)
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1
    for block in (1, 4, 10):
        assert adm.precision_recall(ref, fake, block=block) == whole
        torch.testing.assert_close(
            adm.manifold_radii(ref, block=block), adm.manifold_radii(ref), rtol=0, atol=0
        )


def test_float16_distances_round_like_adm_and_fall_back_on_overflow():
    rng = np.random.default_rng(4)
    u = torch.from_numpy(rng.normal(size=(6, 32)).astype(np.float32)) * 4
    v = torch.from_numpy(rng.normal(size=(5, 32)).astype(np.float32)) * 4
    d16 = adm._sq_distances(u, v, "float16")
    d32 = adm._sq_distances(u, v, "float32")
    assert torch.equal(d16, d16.half().float())  # every value is a float16 value
    torch.testing.assert_close(
        d16, torch.cdist(u.double(), v.double()).pow(2).float(), rtol=2e-2, atol=1
    )
    torch.testing.assert_close(
        d32, torch.cdist(u.double(), v.double()).pow(2).float(), rtol=1e-5, atol=1e-3
    )
    big = u * 100  # squared norms ~ 5e5 > 65504: the float16 block is not finite -> float32
    assert torch.equal(adm._sq_distances(big, v, "float16"), adm._sq_distances(big, v, "float32"))


def test_precision_recall_rejects_bad_inputs():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="widths differ"):
        adm.precision_recall(x, np.zeros((10, 3), np.float32))
    with pytest.raises(ValueError, match="N >= 4"):
        adm.precision_recall(x, x[:3])
    with pytest.raises(ValueError, match="distance_dtype"):
        adm.precision_recall(x, x, distance_dtype="bfloat16")


# ----------------------------------------------------------------------------------------- npz files


def test_reference_batch_round_trips_the_adm_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 9, 11, 3), dtype=np.uint8)
    pool = GaussianStatistics(rng.normal(size=4), np.cov(rng.normal(size=(20, 4)), rowvar=False))
    spatial = GaussianStatistics(rng.normal(size=3), np.cov(rng.normal(size=(20, 3)), rowvar=False))
    labels = np.arange(7) % 3
    path = tmp_path / "ref.npz"
    write_reference(path, images, (pool, spatial), labels=labels, protocol={"resize": "x"})
    with np.load(path) as z:  # exactly ADM's keys and dtypes (+ labels and snce's record)
        assert set(z.files) == {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s", "snce_protocol"}
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 9, 11, 3)
        assert (
            z["mu"].dtype == z["sigma"].dtype == z["mu_s"].dtype == z["sigma_s"].dtype == np.float64
        )
    got = read_npz(path)
    assert len(got.images) == 7 and got.protocol == {"resize": "x"}
    np.testing.assert_array_equal(np.concatenate(list(got.images.batches(3))), images)
    np.testing.assert_array_equal(got.labels, labels)
    for want, have in zip((pool, spatial), got.statistics, strict=True):
        np.testing.assert_array_equal(have.mu, want.mu)
        np.testing.assert_array_equal(have.sigma, want.sigma)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_images_stream_from_files_numpy_writes(tmp_path, save):
    """An ADM-layout file written by numpy itself (as guided-diffusion does) streams in file order."""
    images = np.random.default_rng(1).integers(0, 256, size=(10, 5, 6, 3), dtype=np.uint8)
    save(tmp_path / "s.npz", images, np.arange(10))  # -> arr_0, arr_1
    reader = NpzImages(tmp_path / "s.npz", "arr_0")
    assert reader.shape == (10, 5, 6, 3) and reader._streams
    batches = list(reader.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(read_npz(tmp_path / "s.npz").labels, np.arange(10))


def test_streamed_writer_matches_numpy_and_checks_counts(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    adm.write_npz(
        tmp_path / "a.npz",
        {"arr_0": iter([images[:2], images[2:]])},
        shapes={"arr_0": images.shape},
    )
    with np.load(tmp_path / "a.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)
    with pytest.raises(ValueError, match="wrote 2 rows, declared 5"):
        adm.write_npz(
            tmp_path / "b.npz", {"arr_0": iter([images[:2]])}, shapes={"arr_0": images.shape}
        )
    assert not (tmp_path / "b.npz").exists() and not list(tmp_path.glob(".*tmp*"))


def test_npz_reader_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8 images"):
        read_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="need all of"):
        read_npz(tmp_path / "s.npz")
    np.savez(tmp_path / "e.npz", other=np.zeros(2))
    with pytest.raises(ValueError, match="neither images"):
        read_npz(tmp_path / "e.npz")
    np.savez(
        tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(1), sigma_s=np.eye(1)
    )
    with pytest.raises(ValueError, match="no images"):
        read_npz(tmp_path / "stats.npz", need_images=True)


# ------------------------------------------------------------------------------------------ features


def test_adm_features_are_the_graph_tensors_adm_reads():
    """pool_3, mixed_6/conv[..., :7] (NHWC-flattened) and pool_3 @ W, read here through forward hooks on the
    modules that compute them, at the real 299 x 299 input; the input is (x - 128) / 128."""
    net = _random_inception()
    seen = {}
    hooks = [
        net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0])),
        net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, o: seen.__setitem__("conv", o)),
        net.Mixed_7c.register_forward_hook(lambda m, a, o: seen.__setitem__("7c", o)),
    ]
    pixels = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)
    out = net.adm_features(pixels)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen["input"], (pixels.permute(0, 3, 1, 2).float() - 128) / 128)
    conv = seen["conv"]  # (2, 192, 17, 17): Mixed_6d's 1x1 branch after BN + ReLU
    assert conv.shape == (2, 192, 17, 17)
    want_spatial = torch.stack(
        [
            torch.tensor([conv[n, c, h, w] for h in range(17) for w in range(17) for c in range(7)])
            for n in range(2)
        ]
    )
    assert out.spatial.shape == (2, 2023)
    torch.testing.assert_close(out.spatial, want_spatial, rtol=0, atol=0)
    torch.testing.assert_close(out.pool, seen["7c"].mean(dim=(2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(out.logits, out.pool @ net.fc.weight.T, rtol=0, atol=0)
    assert out.pool.abs().mean() > 0.1  # the random network's features are not vanishingly small
    # the features of an image do not depend on its batch
    single = net.adm_features(pixels[1:])
    torch.testing.assert_close(single.pool, out.pool[1:], rtol=1e-4, atol=1e-5)
    # snce's own path (images in [-1, 1]) still returns (pool_3, logits)
    feats, logits = net(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)


def test_resizes():
    x = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    # TF-1 ResizeBilinear 2 -> 4: source x = i * 0.5 -> 0, 0.5, 1, 1.5 (clamped to the last pixel)
    torch.testing.assert_close(
        tf1_resize_bilinear(x, 1, 4), torch.tensor([[[[0.0, 5.0, 10.0, 10.0]]]])
    )
    y = torch.arange(4.0).view(
        1, 1, 1, 4
    )  # 4 -> 2: source x = 0, 2 (no antialiasing: pixels skipped)
    torch.testing.assert_close(tf1_resize_bilinear(y, 1, 2), torch.tensor([[[[0.0, 2.0]]]]))
    img = torch.rand(2, 3, 64, 48) * 255
    torch.testing.assert_close(
        resize_299(img, "bilinear-antialias"),
        F.interpolate(img, size=(299, 299), mode="bilinear", antialias=True, align_corners=False),
    )
    assert resize_299(img, "tf-bilinear").shape == (2, 3, 299, 299)
    same = torch.rand(1, 3, 299, 299)
    assert resize_299(same, "tf-bilinear") is same
    with pytest.raises(ValueError, match="resize must be one of"):
        resize_299(img, "bicubic")


def test_center_crop_adm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8))
    out = adm.center_crop_adm(
        img, 32
    )  # 200 x 90 -> box-halved to 100 x 45 -> 71 x 32 -> centre 32 x 32
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    halved = img.resize((100, 45), resample=Image.BOX)
    want = np.asarray(halved.resize((71, 32), resample=Image.BICUBIC))[:, 19:51]
    np.testing.assert_array_equal(out, want)


# ----------------------------------------------------------------------------------------------- CLI


def _low_rank_sqrtm(a: np.ndarray) -> np.ndarray:
    """A stand-in for scipy's sqrtm with the same trace on the low-rank products a handful of images give
    (scipy's takes minutes at 2048 x 2048 on a shared 2-core CPU): sqrtm of a restricted to its range."""
    probe = np.random.default_rng(0).normal(size=(a.shape[0], 32))
    q, _ = np.linalg.qr(a @ probe)
    return q @ SCIPY_SQRTM(q.T @ a @ q) @ q.T


def test_cli_end_to_end_reference_and_evaluation(tmp_path, monkeypatch, capsys):
    """`snce eval --make-ref` writes an ADM-layout reference batch from a folder; `snce eval SAMPLES --ref`
    writes all five numbers and the protocol; the reference's own images score FID ~ 0, precision = recall = 1.
    (The FID's matrix square root is swapped for a low-rank equivalent for speed; the unit tests above check
    the real one.)"""
    monkeypatch.setattr(adm.linalg, "sqrtm", _low_rank_sqrtm)
    weights = tmp_path / "w.pth"
    torch.save(_random_inception().state_dict(), weights)
    rng = np.random.default_rng(0)
    folder = tmp_path / "real"
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"class{c}" / f"{i}.png")
    ref = tmp_path / "ref.npz"
    common = ["--inception-weights", str(weights), "--device", "cpu", "--batch-size", "3"]
    assert (
        main(["eval", "--make-ref", str(folder), "--out", str(ref), "--size", "32", *common]) == 0
    )
    with np.load(ref) as z:
        assert {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"} <= set(z.files)
        assert z["arr_0"].shape == (8, 32, 32, 3) and z["arr_0"].dtype == np.uint8
        assert z["mu"].shape == (2048,) and z["sigma_s"].shape == (2023, 2023)
        assert z["arr_1"].tolist() == [0] * 4 + [1] * 4
        ref_images = z["arr_0"]

    samples = tmp_path / "samples.npz"
    fake = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(samples, fake, np.array([0, 1, 2, 0, 1, 2]))
    out = tmp_path / "result.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--out", str(out), *common]) == 0
    result = json.loads(out.read_text())
    assert '"sfid"' in capsys.readouterr().out
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["fid"] > 0 and result["sfid"] > 0 and 1 <= result["is"] <= 1008
    protocol = result["protocol"]
    assert (
        protocol["feature_network"]["weights"]["sha256"]
        == hashlib.sha256(weights.read_bytes()).hexdigest()
    )
    assert protocol["reference"]["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert protocol["reference"]["statistics"].startswith("precomputed")
    assert protocol["reference"]["made_by_snce"]["resize"]["method"] == "bilinear-antialias"
    assert protocol["samples"]["count"] == 6 and protocol["samples"]["image_size"] == [32, 32]
    assert protocol["samples"]["class_balance"] == {
        "classes": 3, "min_per_class": 2, "max_per_class": 2, "balanced": True
    }  # fmt: skip
    assert protocol["resize"]["method"] == "bilinear-antialias" and protocol["is"]["splits"] == [6]
    assert protocol["precision_recall"]["k"] == 3

    # the reference's own images as samples: same features as the reference's statistics
    own = tmp_path / "own.npz"
    np.savez(own, ref_images)
    assert (
        main(["eval", str(own), "--ref", str(ref), "--out", str(tmp_path / "own.json"), *common])
        == 0
    )
    same = json.loads((tmp_path / "own.json").read_text())
    assert abs(same["fid"]) < 1e-3 * _trace(ref, "sigma")
    assert abs(same["sfid"]) < 1e-3 * _trace(ref, "sigma_s")
    assert same["precision"] == 1.0 and same["recall"] == 1.0

    # a reference of statistics only (no images): FID and sFID, no precision/recall
    stats_only = tmp_path / "stats.npz"
    with np.load(ref) as z:
        np.savez(stats_only, **{k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    partial = adm.evaluate(own, stats_only, inception_weights=weights, batch_size=8, progress=False)
    assert partial["fid"] == pytest.approx(same["fid"], abs=1e-3 * _trace(ref, "sigma"))
    assert partial["precision"] is None and partial["recall"] is None
    assert partial["protocol"]["reference"]["count"] == 0


def _trace(path, key: str) -> float:
    with np.load(path) as z:
        return float(np.trace(z[key]))


def test_cli_argument_errors(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "one of SAMPLES.npz" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "s.npz")]) == 2
    assert "needs --ref" in capsys.readouterr().err
    assert main(["eval", "--make-ref", str(tmp_path)]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "s.npz"), "--samples", str(tmp_path)]) == 2
    assert "got SAMPLES.npz, --samples" in capsys.readouterr().err
