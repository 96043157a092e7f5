"""Condition encoders: the OpenCLIP text tower against open_clip itself; frozen vs trainable; weights from a path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from trainer.models.text_encoders import (
    TINY_OPENCLIP,
    ClassEmbedder,
    ClassEmbedderConfig,
    OpenCLIPConfig,
    OpenCLIPTextEncoder,
    TransformerTextConfig,
    TransformerTextEncoder,
)

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle in the top left", "", "a blue cross in the bottom right"]


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A full (random) tiny CLIP checkpoint on disk, and the model it came from."""
    OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP))  # registers the architecture
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_OPENCLIP, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    return path, clip


def test_sd2_conditioning_equals_open_clip_penultimate_layer(tiny_clip_file):
    path, clip = tiny_clip_file
    enc = OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP, pretrained=str(path)))
    cond = enc(CAPTIONS)
    ids = open_clip.get_tokenizer("ViT-H-14")(CAPTIONS)
    with torch.no_grad():
        layers = len(clip.transformer.resblocks)
        ref = clip.forward_intermediates(
            text=ids, text_indices=[layers - 2], normalize_intermediates=True, intermediates_only=True
        )["text_intermediates"][0]
        pooled = clip.encode_text(ids)
    assert cond.tokens.shape == (3, 77, 64)
    assert torch.allclose(cond.tokens, ref, atol=1e-5)
    assert torch.allclose(cond.pooled, pooled, atol=1e-5)
    assert torch.equal(cond.mask, ids != 0)


def test_frozen_encoder_stays_frozen_in_train_mode():
    enc = OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP))
    enc.train()
    assert not enc.training and not enc.trainable
    assert not any(p.requires_grad for p in enc.parameters())


def test_missing_or_wrong_weights_fail_with_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.pretrained.*nope\.pt"):
        OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP, pretrained=str(tmp_path / "nope.pt")))
    torch.save({"unrelated": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="lacks text weights"):
        OpenCLIPTextEncoder(OpenCLIPConfig(model_name=TINY_OPENCLIP, pretrained=str(tmp_path / "bad.pt")))
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        OpenCLIPTextEncoder(OpenCLIPConfig(model_name="no-such-model"))


def test_trainable_transformer_learns_and_masks_padding():
    enc = TransformerTextEncoder(TransformerTextConfig(width=32, layers=2, heads=2, context_length=16))
    assert enc.trainable and all(p.requires_grad for p in enc.parameters())
    cond = enc(CAPTIONS)
    assert cond.tokens.shape == (3, 16, 32) and cond.pooled.shape == (3, 32)
    assert cond.mask[1].sum() == 2  # "" is start + end tokens
    # padding does not leak into real tokens
    longer = enc(["a red circle in the top left"])
    assert torch.allclose(longer.tokens[0, :9], cond.tokens[0, :9], atol=1e-5)
    cond.pooled.sum().backward()
    assert enc.token_embedding.weight.grad is not None


def test_transformer_with_no_layers_keeps_every_word_to_itself():
    """layers=0: a token's output is its own embedding plus position, so changing one word changes that token
    only (with layers it changes every token); it still trains."""
    swap = ["a red circle in the top left", "a red circle in the top right"]
    for layers, changed in ((0, {7}), (2, set(range(9)))):  # 9 tokens: start, 7 words, end
        torch.manual_seed(0)
        enc = TransformerTextEncoder(
            TransformerTextConfig(width=32, layers=layers, heads=2, context_length=16)
        )
        out = enc(swap)
        moved = set(((out.tokens[0] - out.tokens[1]).abs().sum(-1) > 1e-6).nonzero().flatten().tolist())
        assert moved & set(range(9)) == changed, (layers, moved)
    out.pooled.sum().backward()
    assert enc.token_embedding.weight.grad is not None


def test_class_embedder_has_a_null_class():
    enc = ClassEmbedder(ClassEmbedderConfig(num_classes=5, dim=8))
    cond = enc(torch.tensor([0, 4, -1]))
    assert cond.tokens.shape == (3, 1, 8)
    assert torch.equal(cond.pooled[2], enc.embedding.weight[5])


def test_the_tokenizer_loaded_on_its_own_is_open_clips(tmp_path):
    """Our text encoders load open_clip's tokenizer module without importing open_clip (seconds per process):
    the ids are open_clip's own, and open_clip itself stayed unimported."""
    texts = [*CAPTIONS, "Ünïcödé &amp; <b>html</b>  spaces", "word " * 100]
    script = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
from trainer.models.text_encoders import _tokenizer
ids = _tokenizer(77)({texts!r})
print(json.dumps({{"ids": ids.tolist(), "open_clip": "open_clip" in sys.modules}}))
"""
    out = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    assert out["open_clip"] is False
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer(context_length=77)(texts)
    assert out["ids"] == ref.tolist()
