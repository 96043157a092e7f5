"""Condition encoders and concat conditions of every mode, in-process: what a batch becomes, the null conditions
for guidance, and the class labels that reach the UNet's label embedding."""

from __future__ import annotations

import pytest
import torch
from presets import model

from trainer.config import ConfigError, compose
from trainer.diffusion.guidance import batch_conditions
from trainer.models.conditions import LayoutConfig, LayoutEncoder, Unconditional, UnconditionalConfig
from trainer.models.text_encoders import ClassEmbedder, ClassEmbedderConfig
from trainer.tasks.concat import SemanticConcat, SemanticConfig
from trainer.tasks.unet import DiffusionModel


def test_class_labels_reach_the_unet_label_embedding():
    """Regression: a UNet with unet.num_classes > 0 once got no labels (y) in training. The labels of the batch
    key go to the label embedding (null class = the last label) as well as to the cross-attention token."""
    torch.manual_seed(0)
    encoder = ClassEmbedder(ClassEmbedderConfig(num_classes=4, dim=64))
    unet = model("unet/tiny", seed=0, num_classes=5)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net = DiffusionModel(unet, encoder)
    batch = {
        "key": ["a", "b", "c"],
        "class_id": torch.tensor([1, 1, 3]),
        "dropped": torch.tensor([0, 1, 0]).bool(),
    }
    conds = encoder.conditions(batch)
    assert conds == [1, -1, 3] and encoder.batch_keys() == {"class_id"}
    assert encoder(conds).labels.tolist() == [1, 4, 3]
    x, t = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1), torch.tensor([500, 500, 500])
    out = net(x, t, conditions=conds)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    out.pow(2).mean().backward()
    assert unet.label_emb.weight.grad[[1, 3, 4]].abs().sum(1).gt(0).all()
    assert unet.label_emb.weight.grad[[0, 2]].abs().sum() == 0  # labels not in the batch get nothing
    with torch.no_grad():  # the label embedding alone changes the output (tokens fixed)
        tokens = encoder([1, 1]).tokens
        a = net(x[:2], t[:2], context=tokens, labels=torch.tensor([0, 2]))
    assert not torch.allclose(a[0], a[1])


def test_num_classes_must_match_the_encoder_labels(tmp_path):
    from trainer.train import prepare

    cfg = compose("train", ["experiment=class_cond_shapes", "weights.autoencoder=", f"run_dir={tmp_path}",
                            "weights.allow_random_autoencoder=true", "data.urls=unused", "unet.num_classes=24"])  # fmt: skip
    parts = prepare(cfg, load_models=False, check_files=False)
    with pytest.raises(ConfigError, match=r"unet\.num_classes=24 but the condition encoder gives 25"):
        parts.task.build_models(cfg)


def test_class_prompts_are_parsed_and_checked():
    enc = ClassEmbedder(ClassEmbedderConfig(num_classes=4, dim=8, key="caption"))
    assert enc.conditions({"key": [0, 1], "caption": ["3", ""]}) == [3, -1]
    assert enc.parse(" 2 ") == 2 and enc.parse("") == -1
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        enc.parse("4")
    with pytest.raises(ValueError, match="class ids as prompts"):
        enc.parse("a red circle")


def test_layout_tokens_are_class_and_quantised_corners():
    enc = LayoutEncoder(LayoutConfig(num_classes=24, max_objects=2, bins=4, width=32, layers=1, heads=2))
    batch = {"key": ["a", "b"], "boxes": [[[0.0, 0.3, 0.51, 0.99]], [[0.1, 0.1, 0.2, 0.2]]],
             "box_labels": [[7], [3]], "dropped": torch.tensor([False, True])}  # fmt: skip
    conds = enc.conditions(batch)
    assert conds == [[(7, [0.0, 0.3, 0.51, 0.99])], []]
    ids = enc.tokenize(conds)
    start, pad = 24 + 16, 24 + 17
    # (x0, y0) = (0.0, 0.3) -> cell (0, 1); (x1, y1) = (0.51, 0.99) -> cell (2, 3); cell (x, y) = 24 + 4y + x
    assert ids[0].tolist() == [start, 7, 24 + 4 * 1 + 0, 24 + 4 * 3 + 2, pad, pad, pad]
    assert ids[1].tolist() == [start] + [pad] * 6
    out = enc(conds)
    assert out.tokens.shape == (2, 7, 32) and out.mask[0].tolist() == [True] * 4 + [False] * 3
    assert enc.parse("[[7, 0.0, 0.3, 0.51, 0.99]]") == conds[0] and enc.parse("") == []
    assert torch.isfinite(enc(enc.null_conditions(3)).tokens).all()
    with pytest.raises(ValueError, match="max_objects=2"):
        enc.tokenize([[(1, [0, 0, 1, 1])] * 3])
    with pytest.raises(ValueError, match="JSON"):
        enc.parse("a red circle")
    # moving a box changes the tokens; padding never changes the real ones
    moved = enc([[(7, [0.6, 0.3, 0.9, 0.99])]]).tokens
    assert not torch.allclose(moved[0, :4], out.tokens[0, :4])


def test_unconditional_gives_one_constant_token():
    enc = Unconditional(UnconditionalConfig(dim=16))
    conds = enc.conditions({"key": ["a", "b", "c"], "caption": ["x", "y", "z"]})
    out = enc(conds)
    assert conds == [None] * 3 and out.tokens.shape == (3, 1, 16) and not out.tokens.any()
    assert enc.batch_keys() == frozenset() and not enc.trainable and enc.parse("anything") is None
    assert enc.to(torch.float64)(enc.null_conditions(1)).tokens.dtype == torch.float64


def test_semantic_concat_is_the_class_fraction_per_latent_cell():
    concat = SemanticConcat(SemanticConfig(num_classes=3, key="seg"))
    seg = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    seg[..., :4, :4] = 2
    seg[..., 0, 4] = 1  # one pixel of class 1 in the top-right 4x4 cell
    out = concat.training_input({"seg": seg}, None, torch.zeros(1, 4, 2, 2), None, None)
    assert out.shape == (1, 3, 2, 2) and torch.allclose(out.sum(1), torch.ones(1, 2, 2))
    assert out[0, 2, 0, 0] == 1 and out[0, 1, 0, 1] == 1 / 16 and out[0, 0, 0, 1] == 15 / 16
    twice = concat.sampling_input((1, 4, 4, 4), None, {"segmentation": seg})  # any latent size
    assert twice.shape == (1, 3, 4, 4) and twice[0, 2, :2, :2].eq(1).all()
    assert concat.needs() == {"seg"} and concat.channels(4) == 3


def test_guidance_batches_token_and_label_conditions():
    cond = (torch.ones(2, 1, 3), torch.tensor([1, 2]))
    uncond = (torch.zeros(2, 1, 3), torch.tensor([9, 9]))
    tokens, labels = batch_conditions(uncond, cond)
    assert tokens.shape == (4, 1, 3) and labels.tolist() == [9, 9, 1, 2]
    assert batch_conditions((torch.ones(1, 1, 1), None), (torch.ones(1, 1, 1), None))[1] is None


def test_scale_factor_recorded_with_the_weights_wins_over_measuring(tmp_path):
    """The UNet stage takes the latent scale from the data (latent shards), else from the autoencoder's weights
    when they record one, else from autoencoder.scale_factor when set; only then does it measure (None here)."""
    import json

    from safetensors.torch import save_file

    from trainer.train import prepare

    ae = model("autoencoder/tiny", seed=0)
    save_file(ae.state_dict(), str(tmp_path / "autoencoder.safetensors"))
    base = ["experiment=uncond_shapes", f"run_dir={tmp_path}", "data.urls=unused"]
    for record, config_value, expected in ((0.37, 0.0, 0.37), (None, 0.0, None), (None, 0.25, 0.25)):
        (tmp_path / "autoencoder.json").write_text(json.dumps({"scale_factor": record}))
        cfg = compose(
            "train", [*base, f"weights.autoencoder={tmp_path}", f"autoencoder.scale_factor={config_value}"]
        )
        parts = prepare(cfg, load_models=False, check_files=False)
        parts.task.build_models(cfg)
        assert parts.task.recorded_scale == expected
