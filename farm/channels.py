"""Output channels made from a model's outputs: alpha, fgr, comp (over a colour), rgb, rgba."""

from __future__ import annotations

import numpy as np

# channel -> (model outputs it needs, components)
CHANNEL_NEEDS: dict[str, tuple[tuple[str, ...], int]] = {
    "alpha": (("alpha",), 1),
    "fgr": (("fgr",), 3),
    "comp": (("alpha", "fgr"), 3),
    "rgb": (("rgb",), 3),
    "rgba": (("alpha", "fgr"), 4),
}


def missing_outputs(channel: str, model_outputs: tuple[str, ...]) -> list[str]:
    """The model outputs a channel needs that this model does not produce."""
    needs, _ = CHANNEL_NEEDS[channel]
    if channel == "comp" and "comp" in model_outputs:
        return []
    return [n for n in needs if n not in model_outputs]


def components(channel: str) -> int:
    return CHANNEL_NEEDS[channel][1]


def channel_frames(outputs: dict[str, np.ndarray], channel: str, background=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``float32 [T, H, W, C]`` in [0, 1] for one channel."""
    if channel in ("alpha", "fgr", "rgb"):
        return outputs[channel]
    if channel == "comp":
        if "comp" in outputs:
            return outputs["comp"]
        bg = np.asarray(background, dtype=np.float32).reshape(1, 1, 1, 3)
        return outputs["fgr"] * outputs["alpha"] + bg * (1.0 - outputs["alpha"])
    if channel == "rgba":
        return np.concatenate([outputs["fgr"], outputs["alpha"]], axis=-1)
    raise ValueError(f"unknown channel {channel!r}")
