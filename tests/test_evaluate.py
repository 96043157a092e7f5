"""ldm-eval: metric math against float64 / scikit-image references, the adherence scorer on ground truth."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data_pipeline.synthetic import write_synthetic
from data_pipeline.tario import iter_shard
from trainer.evaluate.adherence import read_image, score
from trainer.evaluate.fid import fid, kid
from trainer.evaluate.recon import psnr, ssim


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("gt")
    write_synthetic(str(out), 600, 300, 64, seed=5, split="all", progress=False)
    images, prompts = [], []
    for shard in sorted(out.glob("*.tar")):
        for s in iter_shard(str(shard)):
            images.append(np.asarray(Image.open(io.BytesIO(s.files["jpg"])).convert("RGB")))
            prompts.append(s.files["txt"].decode())
    return images, prompts


def test_scorer_reads_the_ground_truth(ground_truth):
    result = score(*ground_truth)
    assert result["n"] == 600
    assert result["colour"] >= 0.99 and result["shape"] >= 0.99 and result["position"] >= 0.99
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert read_image(blank).colour == "none"


def random_features(n: int, seed: int) -> torch.Tensor:
    """A tiny random convolutional feature network on random images: stand-in for Inception."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    with torch.no_grad():
        return net(images).double()


def test_fid_matches_a_scipy_float64_reference():
    a, b = random_features(200, 1), random_features(180, 2) * 1.1 + 0.05
    x, y = a.numpy(), b.numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_matches_the_unbiased_mmd_formula():
    a, b = random_features(60, 3), random_features(60, 4) + 0.1
    d = a.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    n = 60
    xx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(n) for j in range(n)) / (n * n)
    mean, _ = kid(a, b, subsets=1, subset_size=n)  # the full sets: no sampling
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_psnr_and_ssim_match_scikit_image():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 48, 40, generator=g)
    b = (a + 0.08 * torch.randn(2, 3, 48, 40, generator=g)).clamp(0, 1)
    for i in range(2):
        x, y = (
            a[i].permute(1, 2, 0).numpy().astype(np.float64),
            b[i].permute(1, 2, 0).numpy().astype(np.float64),
        )
        assert psnr(a, b)[i].item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), rel=1e-9)
        ref = structural_similarity(
            x,
            y,
            data_range=1.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert ssim(a, b)[i].item() == pytest.approx(ref, rel=1e-6)


def test_clip_score_is_the_scaled_cosine_of_open_clip_embeddings():
    import open_clip

    from trainer.evaluate.clip_score import clip_score, load_clip
    from trainer.models.text_encoders import TINY_OPENCLIP, OpenCLIPConfig, OpenCLIPTextEncoder

    OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP))  # registers the tiny architecture
    torch.manual_seed(0)
    model, _, tokenizer = load_clip(TINY_OPENCLIP, None)
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square", "a green cross"]
    got = clip_score(model, tokenizer, images, prompts)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    with torch.no_grad():
        i = model.encode_image((images - mean) / std)
        t = model.encode_text(open_clip.get_tokenizer(TINY_OPENCLIP)(prompts))
    want = 100 * torch.nn.functional.cosine_similarity(i, t).clamp(min=0)
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(FileNotFoundError, match=r"eval\.clip_weights"):
        load_clip(TINY_OPENCLIP, "/nonexistent/clip.bin")


def test_cli_adherence_and_missing_weights(ground_truth, tmp_path):
    images, prompts = ground_truth
    rows = []
    for i, (img, p) in enumerate(zip(images[:40], prompts[:40], strict=True)):
        Image.fromarray(img).save(tmp_path / f"{i:04d}.png")
        rows.append({"file": f"{i:04d}.png", "prompt": p, "seed": i})
    (tmp_path / "prompts.json").write_text(json.dumps(rows))
    out = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate.cli", "adherence", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["all"] >= 0.99
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate.cli",
            "fid",
            str(tmp_path),
            str(tmp_path),
            "--inception-weights",
            "/nonexistent/inception.pth",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "eval.inception_weights" in out.stderr
