"""conf/data/*.yaml against the structured schema: typos and wrong types fail at load."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from data_pipeline.config import DataConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_shipped_data_configs_match_the_schema(name):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / f"{name}.yaml"))
    assert cfg.kind in ("images", "latents")


def test_typo_and_wrong_type_fail():
    schema = OmegaConf.structured(DataConfig)
    with pytest.raises(ConfigKeyError, match="resolutoin"):
        OmegaConf.merge(schema, {"resolutoin": 64})
    with pytest.raises(ValidationError, match="batch_size"):
        OmegaConf.merge(schema, {"batch_size": "many"})
