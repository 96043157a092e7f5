"""The shipped configs against their schemas, in-process: every component YAML type-checks against the Config
of the class its _target_ names, every experiment composes and builds, and bad values fail at start naming the
key."""

from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from data_pipeline.loader import DataSource
from trainer.config import ConfigError, build, component_class, compose, conf_root, typed
from trainer.diffusion.objectives import Diffusion
from trainer.engine.loggers import Logger
from trainer.engine.optim import LRSchedule, Optimizer
from trainer.models.autoencoder import Autoencoder
from trainer.models.text_encoders import ConditionEncoder
from trainer.models.unet import UNetModel
from trainer.tasks.base import Task
from trainer.train import prepare

GROUPS = {
    "task": Task,
    "data": DataSource,
    "unet": UNetModel,
    "autoencoder": Autoencoder,
    "text_encoder": ConditionEncoder,
    "optim": Optimizer,
    "lr_schedule": LRSchedule,
    "logger": Logger,
}
SHIPPED = [(g, p.stem) for g in GROUPS for p in sorted((conf_root() / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (conf_root() / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group,name", SHIPPED, ids=[f"{g}/{n}" for g, n in SHIPPED])
def test_every_shipped_component_config_matches_its_class_schema(group, name):
    node = OmegaConf.load(conf_root() / group / f"{name}.yaml")
    cfg = typed(node, group, GROUPS[group])
    assert cfg._target_ == node._target_
    # every field is written out, so every knob shows in the file and overrides need no '+'
    raw = yaml.safe_load((conf_root() / group / f"{name}.yaml").read_text())
    schema = OmegaConf.structured(component_class(node._target_, group).Config)
    for key in schema:
        assert key in raw, f"{group}/{name}.yaml lacks {key}"
        if OmegaConf.is_dict(schema[key]) and schema[key]:
            assert set(schema[key]) <= set(raw[key] or {}), f"{group}/{name}.yaml lacks some {key}.*"


@pytest.mark.parametrize("name", sorted(p.stem for p in (conf_root() / "diffusion").glob("*.yaml")))
def test_diffusion_presets_build(name):
    d = Diffusion.from_node(OmegaConf.load(conf_root() / "diffusion" / f"{name}.yaml"))
    assert d.schedule.alphas_cumprod.shape == (1000,)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_builds(name, tmp_path):
    cfg = compose("train", [f"experiment={name}", "weights.autoencoder=", "weights.allow_random_autoencoder=true",
                            f"run_dir={tmp_path}", "data.urls=unused"])  # fmt: skip
    parts = prepare(cfg, load_models=False, check_files=False)
    assert parts.task.config._target_ == cfg.task._target_


def test_a_typo_or_a_wrong_type_is_named():
    node = {"_target_": "data_pipeline.images.ImageShards", "resolutoin": 64}
    with pytest.raises(ConfigError, match="resolutoin"):
        typed(node, "data", DataSource)
    with pytest.raises(ConfigError, match="batch_size"):
        typed({"_target_": "data_pipeline.images.ImageShards", "batch_size": "many"}, "data", DataSource)


@pytest.mark.parametrize(
    "target,message",
    [
        ("os.system", "only component classes of this project"),
        ("builtins.open", "only component classes of this project"),
        ("torch.load", "only component classes of this project"),
        ("trainer.config.compose", "is not a component"),
        ("trainer.models.unet.UNetModel", "is not a Logger"),
        ("trainer.engine.loggers.Nope", "does not name a class"),
    ],
)
def test_only_project_components_of_the_right_kind_can_be_built(target, message):
    with pytest.raises(ConfigError, match=message):
        build({"_target_": target}, "logger", Logger)


def test_nested_targets_are_data_not_objects():
    """A component's fields are never instantiated: a nested _target_ stays a plain value."""
    node = {"_target_": "trainer.models.text_encoders.OpenCLIPTextEncoder", "model_name": "ldm-tiny-text",
            "model_config": {"_target_": "os.system", "command": "touch /tmp/pwned-by-config"}}  # fmt: skip
    with pytest.raises((ConfigError, KeyError, ValueError, TypeError)):
        build(node, "text_encoder", ConditionEncoder)
    import os

    assert not os.path.exists("/tmp/pwned-by-config")


def test_sd15_dry_run_prints_the_plan_without_weights(tmp_path, capsys):
    """The SD 1.x preset (CLIP ViT-L/14 through open_clip, SD 1.x UNet) composes and plans without any weight file."""
    import json

    from trainer.train import train

    cfg = compose("train", ["experiment=sd15_512", "dry_run=true", "weights.autoencoder=/models/vae",
                            f"run_dir={tmp_path}", "data.urls=/nonexistent/shards"])  # fmt: skip
    assert cfg.text_encoder.model_name == "ViT-L-14-quickgelu" and cfg.text_encoder.layer == "last"
    assert train(cfg) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 859_000_000 < plan["modules"]["unet"]["total"] < 860_000_000  # SD 1.x UNet: 859.5M
    assert 122_000_000 < plan["modules"]["text_encoder"]["total"] < 124_000_000  # CLIP ViT-L/14 text: 123M
    assert plan["modules"]["text_encoder"]["trainable"] == 0 and plan["latent_size"] == 64
