"""GVM on tiny random-weight diffusers models built from configs (as diffusers' own tests do), on the CPU.

The weights folder is written by the test in diffusers format (``vae/``, ``unet/``, ``scheduler/``) and
loaded by the model's real loading path, locally and from S3; the farm runs go through ``run_job``
(what ``farm submit`` calls) with several shards on a real local Ray.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.base import ModelError
from actors.gvm import GVM, resized_size
from farm.driver import run_job
from farm.encode import SegmentWriter
from farm.plan import plan_shards
from farm.spec import parse_spec
from farm.video import read_frames

FRAMES, H, W = 48, 36, 52
SPEED = 0.12  # radians per frame of the moving pattern: steady motion, so in-window steps are steady


def build_tiny_gvm(root: Path, seed: int = 0) -> Path:
    """vae/ + unet/ + scheduler/ with seeded random weights, the shapes of diffusers' SVD fast tests."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, FlowMatchEulerDiscreteScheduler
    from diffusers import UNetSpatioTemporalConditionModel as UNet

    torch.manual_seed(seed)
    unet = UNet(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=8, projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    )
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    return root


def pattern(t: int, h: int = H, w: int = W) -> np.ndarray:
    """uint8 [H, W, 3]: a diagonal sine pattern drifting sideways, plus a vertical ramp."""
    yy, xx = np.mgrid[:h, :w]
    grey = ((np.sin(xx / 6 + t * SPEED) + 1) * 100 + yy * 1.5).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def weights(tiny_weights) -> Path:
    return tiny_weights("gvm")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("clip") / "drift.mp4")
    writer = SegmentWriter(path, Fraction(24), W, H, quality=4)
    for t in range(FRAMES):
        writer.write(pattern(t))
    writer.close()
    return path


def load(weights: Path | str, **params) -> GVM:
    model = GVM(**{"size": 32, "max_size": None, **params})
    model.load(str(weights))
    return model


def job(clip: str, weights: Path | str, out: Path, window: dict, **params) -> dict:
    return {
        "name": "gvm",
        "inputs": [clip],
        "model": {"name": "gvm", "weights": str(weights), "device": "cpu",
                  "params": {"size": 32, "max_size": None, **params}},
        "window": window,
        "output": {"uri": str(out / "{stem}_{channel}.{ext}"), "channels": ["alpha"], "format": "png"},
        "resources": {"actors": 2},
    }


def render(job_dict: dict) -> np.ndarray:
    """Run through ``run_job`` and read the PNG alpha back as float ``[T, H, W]`` in [0, 1]."""
    from PIL import Image

    result = run_job(parse_spec(yaml.safe_dump(job_dict), "gvm.yaml"))
    assert result.ok, result.manifest
    (entry,) = result.manifest["videos"].values()
    folder = Path(entry["outputs"]["alpha"]["url"])
    frames = [np.asarray(Image.open(p), dtype=np.float64) for p in sorted(folder.glob("*.png"))]
    a = np.stack(frames) / 255
    return a[..., 0] if a.ndim == 4 else a


def seam_and_inside(alpha: np.ndarray, frames: int, overlap: int, margin: int = 2) -> tuple[float, float]:
    """Largest mean |frame-to-frame step| (1/255 units) at seams, and inside windows.

    A seam transition touches frames two shards share (or crosses a hard cut); an inside transition lies
    ``margin`` frames or more inside one window and off every seam. The mean over pixels measures a
    whole-frame jump (what a seam is); a single pixel's max is dominated by the random nets' speckle.
    """
    steps = np.abs(np.diff(alpha, axis=0)).reshape(len(alpha) - 1, -1).mean(axis=1) * 255
    shards = plan_shards("v", len(alpha), frames, overlap)
    seam = {t for a, b in zip(shards, shards[1:], strict=False) for t in range(b.start - 1, a.stop)}
    inside = {t for s in shards for t in range(s.start + margin, s.stop - margin - 1)} - seam
    return float(steps[sorted(seam)].max()), float(steps[sorted(inside)].max())


# ------------------------------------------------------------------------------------------ in-process


def test_renders_alpha_at_source_size_without_hidden_state(weights):
    model = load(weights, noise="gaussian", steps=2, seed=3)
    frames = np.stack([pattern(t, 37, 53) for t in range(6)])  # odd size: resized, padded to 32, cropped back
    out, state = model.render(frames, None, None, span=(10, 16))
    alpha = out["alpha"]
    assert state is None and alpha.shape == (6, 37, 53, 1) and alpha.dtype == np.float32
    assert 0 <= alpha.min() and alpha.max() <= 1 and alpha.std() > 0.01
    again, _ = model.render(frames, None, None, span=(10, 16))
    np.testing.assert_array_equal(again["alpha"], alpha)  # no hidden state: same call, same output
    other_seed, _ = load(weights, noise="gaussian", steps=2, seed=4).render(frames, None, None, span=(10, 16))
    assert np.abs(other_seed["alpha"] - alpha).max() > 0.05  # the seed is used
    other_frames, _ = model.render(frames, None, None, span=(11, 17))
    assert np.abs(other_frames["alpha"] - alpha).max() > 0.05  # noise follows the video frame index


def test_resize_follows_torchvision_and_upstream_defaults():
    assert resized_size(1080, 1920, 720, 1024) == (576, 1024)  # long side capped
    assert resized_size(720, 1280, 720, None) == (720, 1280)
    assert resized_size(1920, 1080, 512, None) == (910, 512)  # portrait: width is the short side
    assert resized_size(36, 52, None, None) == (36, 52)
    model = GVM()
    assert (model.size, model.max_size, model.pad_multiple, model.steps, model.noise) == (720, 1024, 32, 1, "zeros")
    assert GVM().ensemble == 1 and GVM(ensemble=3).ensemble == 3


def test_zero_noise_ensemble_decodes_members_as_one_sequence_as_upstream(weights):
    """Upstream's zero-noise members share their latents; its VAE decodes all members' frames as one
    sequence in decode_chunk_size chunks, then the max is taken. With 24 frames and chunks of 16 the
    members' chunk boundaries differ, so ensemble 3 differs from 1; with chunks of 8 (dividing 24) not."""
    import torch

    frames = np.stack([pattern(t) for t in range(24)])
    for chunk, differs in ((16, True), (8, False)):
        one, three = load(weights, decode_chunk_size=chunk), load(weights, decode_chunk_size=chunk, ensemble=3)
        a1 = one.render(frames, None, None, span=(0, 24))[0]["alpha"]
        a3 = three.render(frames, None, None, span=(0, 24))[0]["alpha"]
        with torch.inference_mode():  # upstream's order, written out: 3 members, one decode, max
            rgb, crop = three.preprocess(frames)
            latents = three.denoise(three.encode(rgb), 0, 0)
            seq = three.decode(torch.cat([latents] * 3, dim=1))
            best = torch.maximum(torch.maximum(seq[:24], seq[24:48]), seq[48:])
            expected = three.postprocess(best, crop, frames.shape[1:3])
        assert np.allclose(a3, expected, atol=1e-6)
        assert (np.abs(a3 - a1).max() > 1e-3) == differs, (chunk, np.abs(a3 - a1).max())


def test_gvm_unet_without_added_time_embedding(weights, tmp_path):
    """GVM's UNet has no ``add_embedding``: loaded into diffusers' class, added_time_ids then add nothing."""
    from safetensors.torch import load_file, save_file

    stripped = tmp_path / "w"
    shutil.copytree(weights, stripped)
    sd_path = stripped / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(sd_path))
    save_file({k: v for k, v in sd.items() if not k.startswith("add_embedding.")}, str(sd_path))
    frames = np.stack([pattern(t) for t in range(4)])
    a = load(stripped, added_time_ids=[6, 127, 0.02])
    b = load(stripped, added_time_ids=[1, 2, 3])
    assert a.time_embedding_zeroed
    np.testing.assert_array_equal(a.render(frames, None, None)[0]["alpha"], b.render(frames, None, None)[0]["alpha"])
    full_a, full_b = load(weights, added_time_ids=[6, 127, 0.02]), load(weights, added_time_ids=[1, 2, 3])
    assert not full_a.time_embedding_zeroed  # a full SVD UNet keeps its embedding: the ids do reach it
    diff = full_a.render(frames, None, None)[0]["alpha"] - full_b.render(frames, None, None)[0]["alpha"]
    assert np.abs(diff).max() > 1e-3


def test_lora_is_merged_into_the_unet(weights, tmp_path):
    """peft-format LoRA (adapter_config.json + pytorch_lora_weights.safetensors) merged: W += alpha/r B A."""
    import torch
    from safetensors.torch import save_file

    w = tmp_path / "w"
    shutil.copytree(weights, w)
    base = load(weights)
    mods = dict(base.unet.named_modules())
    lin = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv = "down_blocks.0.resnets.0.spatial_res_block.conv1"
    g = torch.Generator().manual_seed(0)
    r = 4
    lora = {
        f"base_model.model.{lin}.lora_A.weight": torch.randn(r, mods[lin].weight.shape[1], generator=g),
        f"base_model.model.{lin}.lora_B.weight": torch.randn(mods[lin].weight.shape[0], r, generator=g),
        f"base_model.model.{conv}.lora_A.weight": torch.randn(r, *mods[conv].weight.shape[1:], generator=g),
        f"base_model.model.{conv}.lora_B.weight": torch.randn(mods[conv].weight.shape[0], r, 1, 1, generator=g),
    }
    save_file(lora, str(w / "unet" / "pytorch_lora_weights.safetensors"))
    (w / "unet" / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 8, "peft_type": "LORA"}))
    merged = load(w)
    assert merged.lora_merged and merged.lora_merged.endswith("pytorch_lora_weights.safetensors")
    got = dict(merged.unet.named_modules())
    a, b = lora[f"base_model.model.{lin}.lora_A.weight"], lora[f"base_model.model.{lin}.lora_B.weight"]
    torch.testing.assert_close(got[lin].weight, mods[lin].weight + 2.0 * b @ a)
    a, b = lora[f"base_model.model.{conv}.lora_A.weight"], lora[f"base_model.model.{conv}.lora_B.weight"]
    expected = mods[conv].weight + 2.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(got[conv].weight, expected)
    assert load(w, lora=None).lora_merged is None  # opt out
    half = load(w, lora_scale=0.5)
    torch.testing.assert_close(dict(half.unet.named_modules())[lin].weight,
                               mods[lin].weight + 1.0 * lora[f"base_model.model.{lin}.lora_B.weight"]
                               @ lora[f"base_model.model.{lin}.lora_A.weight"])
    save_file({"base_model.model.nowhere.to_q.lora_A.weight": torch.zeros(r, 8),
               "base_model.model.nowhere.to_q.lora_B.weight": torch.zeros(8, r)},
              str(w / "unet" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ModelError, match="LoRA targets 'nowhere.to_q'"):
        load(w)


def test_bad_weights_and_params_are_named(weights, tmp_path):
    with pytest.raises(ModelError, match="needs weights"):
        GVM().load(None)
    with pytest.raises(ModelError, match="is not a folder"):
        GVM().load(str(weights / "unet" / "config.json"))
    (tmp_path / "vae").mkdir()
    with pytest.raises(ModelError, match="has no vae/config.json"):
        GVM().load(str(tmp_path))
    with pytest.raises(ModelError, match="noise must be one of"):
        GVM(noise="pink")
    with pytest.raises(ModelError, match="memory must be one of"):
        GVM(memory="swap")
    with pytest.raises(ModelError, match="steps must be an integer >= 1"):
        GVM(steps=0)
    with pytest.raises(ModelError, match="frames must be uint8"):
        load(weights).render(np.zeros((2, 8, 8, 3), np.float32), None, None)


def test_weights_folder_from_s3(weights, s3, tmp_path):
    """``s3://bucket/prefix/`` resolves to a cached local folder the real loading path reads."""
    import fsspec

    from farm.weights import resolve

    bucket = s3.make_bucket()
    fs = fsspec.filesystem("s3", **s3.storage_options)
    for f in sorted(p for p in weights.rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{bucket}/models/gvm/{f.relative_to(weights).as_posix()}")
    local = resolve(f"s3://{bucket}/models/gvm", cache_dir=tmp_path / "cache", storage_options=s3.storage_options)
    assert local.is_dir() and (local / "unet" / "config.json").is_file()
    assert resolve(f"s3://{bucket}/models/gvm", cache_dir=tmp_path / "cache",
                   storage_options=s3.storage_options) == local  # cached: one download per node
    frames = np.stack([pattern(t) for t in range(3)])
    np.testing.assert_array_equal(load(local).render(frames, None, None)[0]["alpha"],
                                  load(weights).render(frames, None, None)[0]["alpha"])


# ----------------------------------------------------------------------------------------- farm submit


def windows(model: GVM, frames: np.ndarray, size: int, overlap: int) -> np.ndarray:
    """The video rendered window by window in-process, stitched as farm does: ``[T, H, W]`` float."""
    from farm.stitch import blend

    shards = plan_shards("v", len(frames), size, overlap)
    outs = [model.render(frames[s.start : s.stop], None, None, span=(s.start, s.stop))[0]["alpha"][..., 0]
            for s in shards]
    out = np.zeros(frames.shape[:3], np.float32)
    for s, o in zip(shards, outs, strict=True):
        out[s.core_start : s.core_stop] = o[s.core_start - s.start : s.core_stop - s.start]
    for a, b, oa, ob in zip(shards, shards[1:], outs, outs[1:], strict=False):
        out[b.start : a.stop] = blend(oa[b.start - a.start :, ..., None], ob[: a.stop - b.start, ..., None])[..., 0]
    return np.rint(out * 255).astype(np.float64) / 255  # the levels the PNGs store, as render() reads them


def test_farm_seams_blend_where_hard_cuts_step(ray_session, weights, clip, tmp_path):
    """4 overlapping shards over 2 actors through run_job: alpha at the source size, and no seam steps more
    than frames do inside a window. The control: hard cuts between windows of the same size (upstream's
    demo) do step, so the measurement sees a seam when there is one."""
    blended = render(job(clip, weights, tmp_path / "blend", {"frames": 16, "overlap": 4}))
    assert blended.shape == (FRAMES, H, W)
    frames = np.stack(list(read_frames(clip, 0, FRAMES)))
    hard = windows(load(weights), frames, 16, 0)
    seam_b, inside_b = seam_and_inside(blended, 16, 4)
    seam_h, inside_h = seam_and_inside(hard, 16, 0)
    print(f"mean |step| x255: blended seam {seam_b:.2f} inside {inside_b:.2f}; hard seam {seam_h:.2f} "
          f"inside {inside_h:.2f}")
    assert seam_h > 1.2 * inside_h
    assert seam_b <= inside_b


def test_farm_same_seed_same_alpha(ray_session, weights, clip, tmp_path):
    """Gaussian noise and two Euler steps: the farm's run (4 shards, 2 actors) and a second, in-process run
    with the same seed give the same alpha; the noise follows frame indices, not shards or actors."""
    a = render(job(clip, weights, tmp_path / "a", {"frames": 16, "overlap": 4}, noise="gaussian", steps=2, seed=11))
    assert a.shape == (FRAMES, H, W) and a.std() > 0.01
    frames = np.stack(list(read_frames(clip, 0, FRAMES)))
    b = windows(load(weights, noise="gaussian", steps=2, seed=11), frames, 16, 4)
    core = np.ones(FRAMES, bool)
    for s in plan_shards("v", FRAMES, 16, 4)[1:]:
        core[s.start : s.start + 4] = False
    np.testing.assert_array_equal(a[core], b[core])  # frames one shard rendered: bit for bit
    np.testing.assert_allclose(a[~core], b[~core], atol=1.01 / 255)  # blended from float16 parts: 1 LSB
    other = windows(load(weights, noise="gaussian", steps=2, seed=12), frames, 16, 4)
    assert np.abs(other - a).mean() > 0.01  # and the seed matters
