"""The autoscaler configs pass Ray's own validation, and keep the promises the docs make about them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "cluster.yaml", ROOT / "examples" / "gcp" / "cluster.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cluster_config_is_valid_for_ray(path: Path):
    raw = yaml.safe_load(path.read_text())
    config = prepare_config(raw)  # merged with the provider's defaults, as `ray up` does
    validate_config(config)  # Ray's JSON schema and cross-field checks; raises on any error

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # actors stay off the head
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {"matting_gpu", "gpu80"} <= {r for t in gpu_types.values() for r in t["resources"]}
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())  # scale from zero
    assert config["idle_timeout_minutes"] > 0

    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch" in c)
    farm_at = next(i for i, c in enumerate(setup) if c.rstrip().endswith("/farm"))
    assert torch_at < farm_at  # torch first, so installing farm never pulls another torch
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])


def test_validation_catches_a_broken_config():
    """The check above can fail: an unknown top-level key is refused by Ray's schema."""
    import jsonschema

    raw = yaml.safe_load(CONFIGS[0].read_text())
    raw["idle_timeout_minuts"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
