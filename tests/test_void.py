"""VOID on tiny random-weight CogVideoX-Fun components built from configs and loaded by the real path.

The diffusers-format folder (transformer/, transformer_pass2/, vae/, text_encoder/, tokenizer/,
scheduler/) is written by the test with ``save_pretrained``; nothing is downloaded. Clips are 32x48,
a few denoising steps, windows of 13 frames (4 latents) with 8 frames (2 latents) of overlap.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from actors.base import ModelError, VideoContext
from actors.flow import warp
from actors.void import (
    VOID,
    latent_windows,
    pad_index,
    padded_frames,
    quantize_quadmask,
    window_weights,
    working_size,
)
from farm.encode import SegmentWriter
from farm.stitch import blend
from farm.video import read_frames

T, H, W = 24, 32, 48
LAT = 4  # latent channels of the tiny VAE


# ---------------------------------------------------------------------------------------------- fixtures


def build_tiny_folder(root: Path, seed: int = 0, in_channels: int = 3 * LAT) -> Path:
    """A diffusers-format VOID folder with random tiny components (same layout as the real one)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    for sub in ("transformer", "transformer_pass2"):
        CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=LAT,
            time_embed_dim=8,
            text_embed_dim=16,
            num_layers=1,
            sample_width=16,
            sample_height=16,
            sample_frames=9,
            patch_size=2,
            patch_size_t=2,
            temporal_compression_ratio=4,
            max_text_seq_length=8,
            use_rotary_positional_embeddings=True,
        ).save_pretrained(root / sub)
    AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=LAT,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).save_pretrained(root / "vae")
    T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(
        root / "text_encoder"
    )
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "table": 4, "with": 5, "cup": 6, "on": 7, "it": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    CogVideoXDDIMScheduler(
        timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True
    ).save_pretrained(root / "scheduler")
    return root


def textured_clip(n: int, h: int, w: int, speed: float = 1.0, seed: int = 0) -> np.ndarray:
    """``uint8 [n, h, w, 3]``: a smooth random texture drifting right ``speed`` px per frame."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(1, 3, h + 8, w + int(np.ceil(n * speed)) + 8, generator=g)
    from actors.flow import blur

    big = blur(big, 1.5)
    big = (big - big.min()) / (big.max() - big.min())
    shift = torch.zeros(1, 2, *big.shape[-2:])
    out = []
    for i in range(n):
        shift[:, 0] = -i * speed
        out.append(warp(big, shift)[0, :, 4 : 4 + h, 4 : 4 + w])
    return (torch.stack(out).permute(0, 2, 3, 1).numpy() * 200 + 30).astype(np.uint8)


def quadmask_clip(n: int, h: int, w: int) -> np.ndarray:
    """``uint8 [n, h, w]``: the object (0) moves right, the region it affects (127) under it, the rest 255."""
    q = np.full((n, h, w), 255, np.uint8)
    for i in range(n):
        x0 = 2 + (i * (w - 16)) // max(n - 1, 1)
        q[i, 6:16, x0 : x0 + 10] = 0
        q[i, 16:20, x0 : x0 + 10] = 127
    return q


def write_video(path: Path, frames: np.ndarray, fps: int = 12) -> str:
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    with SegmentWriter(str(path), Fraction(fps), frames.shape[2], frames.shape[1], quality=0) as wr:
        for f in frames:
            wr.write(np.ascontiguousarray(f))
    return str(path)


@pytest.fixture(scope="module")
def folder(tiny_weights) -> Path:
    return tiny_weights("void")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("void_media")
    src = write_video(d / "src.mp4", textured_clip(T, H, W))
    mask = write_video(d / "quadmask.mp4", quadmask_clip(T, H, W))
    static = write_video(d / "static.mp4", textured_clip(T, H, W, speed=0.0))
    everywhere = write_video(d / "remove_all.mp4", np.zeros((T, H, W), np.uint8))
    return {
        "src": src,
        "mask": mask,
        "static": static,
        "remove_all": everywhere,
        "frames": np.stack(list(read_frames(src, 0, T))),
        "static_frames": np.stack(list(read_frames(static, 0, T))),
    }


def make(folder: Path, **params) -> VOID:
    base = dict(
        steps=2,
        refine_steps=2,
        window_frames=13,
        window_overlap=8,
        refine_guidance_scale=2.0,
        noise_scale=8,
        flow_scale=4,
    )
    m = VOID(**{**base, **params})
    m.load(str(folder))
    return m


def context(url: str, mask: str, **params) -> VideoContext:
    return VideoContext(
        url=url,
        frame_count=T,
        width=W,
        height=H,
        fps=12.0,
        params={"mask": mask, "prompt": "a table with a cup", **params},
    )


# ---------------------------------------------------------------------------------------------- pure parts


def test_window_helpers() -> None:
    assert list(quantize_quadmask(np.array([0, 30, 40, 70, 100, 126, 190, 200, 255]))) == [
        0,
        0,
        63,
        63,
        127,
        127,
        127,
        255,
        255,
    ]
    assert working_size(1080, 1920, 384 * 672) == (368, 672)  # aspect kept, multiple of 16, area <= budget
    assert working_size(32, 48, 10**6) == (32, 48)  # never upscaled
    # smallest 4k+1 >= T with k odd (an even latent count), at least the window
    assert [padded_frames(t, 13) for t in (4, 12, 13, 16, 24, 29, 30)] == [13, 13, 13, 21, 29, 29, 37]
    assert list(pad_index(5, 13)) == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1, 2]  # the last frame shows twice
    for length, win, stride in ((8, 6, 4), (22, 22, 4), (50, 22, 4), (31, 8, 2)):
        ws = latent_windows(length, win, stride)
        assert ws[0][0] == 0 and ws[-1][1] == length and all(e - s <= win for s, e in ws)
        assert all(b[0] == a[1] - stride for a, b in zip(ws, ws[1:], strict=False))
        wts = window_weights(ws, length, stride)
        assert all(w.min() > 0 for w in wts)
        if len(ws) > 1:
            assert np.allclose(wts[0][-stride:], np.linspace(1, 0, stride + 2)[1:-1])
            assert np.allclose(wts[1][:stride], np.linspace(0, 1, stride + 2)[1:-1])


# ---------------------------------------------------------------------------------------------- loading


def test_loads_tiny_diffusers_folder_and_refuses_bad_ones(folder: Path, tmp_path: Path) -> None:
    m = make(folder)
    assert m.transformer2 is not m.transformer  # transformer_pass2/ found: pass 2 has its own weights
    assert m.transformer.config.in_channels == 3 * m.vae.config.latent_channels
    assert m.encode_prompt("a table").shape == (8, 16)
    with pytest.raises(ModelError, match="not a folder"):
        VOID().load(str(folder / "vae" / "config.json"))
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    (lacking / "vae").symlink_to(folder / "vae")
    with pytest.raises(ModelError, match="lacks transformer/, text_encoder/, tokenizer/, scheduler/"):
        VOID().load(str(lacking))
    base_layout = build_tiny_folder(tmp_path / "fun_base", in_channels=2 * LAT + 1)  # CogVideoX-Fun's 33-ch layout
    with pytest.raises(ModelError, match="in_channels=9"):
        VOID().load(str(base_layout))


def test_build_folder_from_base_and_void_checkpoints(folder: Path, tmp_path: Path) -> None:
    """The real-weights route: a CogVideoX-Fun base folder + VOID-style flat checkpoints -> a loadable folder."""
    from safetensors.torch import load_file, save_file

    from actors.void import build_folder

    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"state_dict." + k: v for k, v in sd.items()}, str(tmp_path / "void_pass1.safetensors"))
    save_file({k: v * 0.5 for k, v in sd.items()}, str(tmp_path / "void_pass2.safetensors"))
    out = build_folder(
        str(folder),
        str(tmp_path / "void_pass1.safetensors"),
        str(tmp_path / "void"),
        pass2=str(tmp_path / "void_pass2.safetensors"),
    )
    m = VOID()
    m.load(str(out))
    w1 = m.transformer.patch_embed.proj.weight
    assert torch.equal(w1, sd["patch_embed.proj.weight"])
    assert torch.equal(m.transformer2.patch_embed.proj.weight, w1 * 0.5)
    save_file({k: v for k, v in sd.items() if "proj_out" not in k}, str(tmp_path / "partial.safetensors"))
    build_folder(str(folder), str(tmp_path / "partial.safetensors"), str(tmp_path / "bad"))
    with pytest.raises(ModelError, match="does not fit its config"):
        VOID().load(str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------- pass 1


def test_render_shapes_determinism_and_mask_confines_change(folder: Path, media: dict) -> None:
    m = make(folder, feather=2, composite=True)
    cond = m.prepare(context(media["src"], media["mask"]))
    frames = media["frames"]
    out, state = m.render(frames[4:20], cond, None, span=(4, 20))
    rgb = out["rgb"]
    assert state is None and rgb.shape == (16, H, W, 3) and rgb.dtype == np.float32
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0
    again, _ = m.render(frames[4:20], cond, None, span=(4, 20))
    assert np.array_equal(rgb, again["rgb"])  # same seed, same output
    other = make(folder, feather=2, composite=True, seed=7)
    assert np.abs(other.render(frames[4:20], cond, None, span=(4, 20))[0]["rgb"] - rgb).mean() > 1e-3

    # Pixels the quadmask keeps (255), farther than the soft edge (2 * feather px) from a changed pixel,
    # are the source exactly; the removed object's pixels are replaced. The mask moves over time, so
    # this also checks that the mask frames read for span (4, 20) are frames 4..19.
    q = quantize_quadmask(np.stack(list(read_frames(media["mask"], 4, 20)))[..., 0].astype(np.float32))
    near = torch.nn.functional.max_pool2d(torch.from_numpy((q != 255).astype(np.float32))[:, None], 9, 1, 4)[:, 0]
    far = near.numpy() == 0
    src = frames[4:20].astype(np.float32) / 255
    assert far.mean() > 0.3
    assert np.abs(rgb - src)[far].max() < 1e-6
    assert np.abs(rgb - src)[q == 0].mean() > 0.05
    shifted, _ = m.render(frames[5:21], cond, None, span=(5, 21))  # other frames: the object moved
    q2 = quantize_quadmask(np.stack(list(read_frames(media["mask"], 5, 21)))[..., 0].astype(np.float32))
    assert not np.array_equal(q, q2) and np.abs(shifted["rgb"] - frames[5:21] / 255)[q2 == 0].mean() > 0.05


def test_add_noise_in_inpaint_model_and_tiling_defaults(folder: Path, media: dict, tmp_path: Path) -> None:
    """``add_noise_in_inpaint_model`` in transformer/config.json adds upstream's 0.0563-sigma noise to the video
    before encoding (the mask is untouched); VAE tiling is off unless asked or ``memory: sequential``."""
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for sub in ("transformer_pass2", "vae", "text_encoder", "tokenizer", "scheduler"):
        (noisy / sub).symlink_to(folder / sub)
    (noisy / "transformer").mkdir()
    (noisy / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    (noisy / "transformer" / "config.json").write_text(json.dumps({**cfg, "add_noise_in_inpaint_model": True}))
    plain, aug = make(folder), make(noisy)
    assert not plain.add_noise_in_inpaint and aug.add_noise_in_inpaint
    frames = media["frames"][:12]
    gray = quadmask_clip(12, H, W).astype(np.float32)
    v0, m0 = plain.encode_inputs(frames, gray, second=False)
    v1, m1 = aug.encode_inputs(frames, gray, second=False)
    assert torch.equal(m0, m1) and (v1 - v0).abs().mean() > 1e-4
    assert not plain.vae_tiling and VOID(memory="sequential").vae_tiling and VOID(vae_tiling=True).vae_tiling
    assert (VOID().steps, VOID().refine_steps) == (30, 50)  # upstream: 30 (hard-coded) and 50


def test_memory_modes_give_identical_output(folder: Path, media: dict) -> None:
    """full / model_offload / sequential through the shared offload helper (``actors.offload``, whose
    moves the contract suite checks): every mode is accepted and gives the same numbers; on the CPU nothing
    moves and nothing is held on an accelerator."""
    outs = {}
    for mode in ("full", "model_offload", "sequential"):
        m = make(folder, memory=mode, steps=1, refine_steps=1)
        cond = m.prepare(context(media["src"], media["mask"]))
        outs[mode] = m.render(media["frames"][:12], cond, None, span=(0, 12))[0]["rgb"]
        assert m.offload.mode == mode and m.offload.effective == "full" and m.offload_moves == 0
        assert m.memory_bytes() == 0
    assert np.array_equal(outs["full"], outs["model_offload"])
    assert np.array_equal(outs["full"], outs["sequential"])


def test_bad_inputs_are_refused(folder: Path, media: dict, tmp_path: Path) -> None:
    m = make(folder)
    with pytest.raises(ModelError, match="needs a quadmask video"):
        m.prepare(VideoContext(url=media["src"], frame_count=T, width=W, height=H, fps=12.0, params={}))
    short = write_video(tmp_path / "short.mp4", quadmask_clip(10, H, W))
    with pytest.raises(ModelError, match="has 10 frames, the video has 24"):
        m.prepare(context(media["src"], short))
    with pytest.raises(ModelError, match="window_overlap"):
        VOID(window_frames=13, window_overlap=12)
    with pytest.raises(ModelError, match="memory must be one of"):
        VOID(memory="half")


# ---------------------------------------------------------------------------------------------- pass 2


def test_refine_hands_noise_to_next_shard_and_seam_blends(folder: Path, media: dict) -> None:
    """Two shards [0, 16) and [8, 24) share 8 frames. With the warper's state handed over, shard 1 redoes the
    shared frames' warp and continues it: its noise is one pass's noise over the whole clip, frame for frame,
    the two shards agree over the shared frames, and the stitched video has no step at the seam larger than
    inside a shard. Without the handoff the shards disagree more over the shared frames and the seam is a
    larger step (so the measure does see a seam)."""
    m = make(folder, composite=False, refine_guidance_scale=1.0, steps=1, refine_steps=1)
    cond = m.prepare(context(media["static"], media["remove_all"]))
    frames = media["static_frames"]
    p1 = {"rgb": m.render(frames, cond, None, span=(0, T))[0]["rgb"]}  # pass 1 over the video, as stitched

    def sub(a: int, b: int) -> dict:
        return {"rgb": p1["rgb"][a:b]}

    out0, st = m.refine(frames[:16], sub(0, 16), cond, None, (0, 16), 0, 8)
    assert st["warp"].shape == (1 + LAT, 4 * 8, 6 * 8) and st["warp"].dtype == np.float32
    out1, st1 = m.refine(frames[8:], sub(8, 24), cond, st, (8, 24), 8, 0)
    assert st1 is None
    cold1, _ = m.refine(frames[8:], sub(8, 24), cond, None, (8, 24), 0, 0)

    # the noise itself: shard 1's field over its frames (padding included) == one pass's over frames 8..28
    whole, _ = m.warped_noise(p1["rgb"], 0)
    first, handed = m.warped_noise(p1["rgb"][:16], 0, None, 8)
    second, _ = m.warped_noise(p1["rgb"][8:], 8, handed)
    assert torch.equal(handed, torch.from_numpy(st["warp"]))
    assert torch.equal(first[:16], whole[:16]) and torch.equal(second, whole[8:])
    assert not torch.equal(m.warped_noise(p1["rgb"][8:], 8)[0][:8], whole[8:16])
    assert abs(float(whole.std()) - 1.0) < 0.1  # unit Gaussian noise on the latent grid

    shared_hand = np.abs(out0["rgb"][8:] - out1["rgb"][:8]).mean()
    shared_cold = np.abs(out0["rgb"][8:] - cold1["rgb"][:8]).mean()
    assert shared_hand < shared_cold, (
        shared_hand,
        shared_cold,
    )  # closer, not equal: VAE and attention are causal/contextual

    def stitched(second: np.ndarray) -> np.ndarray:
        return np.concatenate([out0["rgb"][:8], blend(out0["rgb"][8:], second[:8]), second[8:]])

    def steps(video: np.ndarray) -> np.ndarray:
        return np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))

    seam = slice(7, 16)  # steps touching the blended frames 8..15
    inside = np.r_[0:6, 17 : T - 1]
    hand, cold = steps(stitched(out1["rgb"])), steps(stitched(cold1["rgb"]))
    assert hand[seam].max() <= hand[inside].max(), (hand[seam], hand[inside])
    assert hand[seam].max() < cold[seam].max(), (hand[seam], cold[seam])  # fresh noise at the seam shows


def test_refine_refuses_state_of_another_size(folder: Path, media: dict) -> None:
    m = make(folder)
    cond = m.prepare(context(media["src"], media["mask"]))
    frames = media["frames"]
    prev = {"rgb": frames[:12].astype(np.float32) / 255}
    bad = {"warp": np.zeros((4, LAT, 8, 8), np.float32)}
    with pytest.raises(ModelError, match="handed-off state 'warp' has shape"):
        m.refine(frames[:12], prev, cond, bad, (0, 12), 4, 0)


# ---------------------------------------------------------------------------------------------- farm submit


def test_farm_submit_void_two_passes(ray_session, folder: Path, tmp_path: Path) -> None:
    from farm.driver import absolute_local_paths, run_job
    from farm.spec import parse_spec

    n = 40
    src = write_video(tmp_path / "clip.mp4", textured_clip(n, H, W))
    mask = write_video(tmp_path / "clip_quadmask.mp4", quadmask_clip(n, H, W))
    out = tmp_path / "out"
    job = {
        "name": "void-tiny",
        "inputs": [src],
        "model": {
            "name": "void",
            "weights": str(folder),
            "params": {
                "mask": mask,
                "prompt": "a table with a cup",
                "steps": 1,
                "refine_steps": 1,
                "window_frames": 13,
                "window_overlap": 8,
                "refine_guidance_scale": 1.0,
                "noise_scale": 8,
                "flow_scale": 4,
                "composite": True,
            },
        },
        "window": {"frames": 24, "overlap": 8},  # shards [0, 24) and [16, 40)
        "output": {"uri": str(out / "{stem}_{channel}"), "format": "png", "channels": ["rgb"]},
        "resources": {"actors": 2},
    }
    result = run_job(absolute_local_paths(parse_spec(yaml.safe_dump(job), "void.yaml")))
    assert result.ok, json.dumps(result.manifest)[:2000]
    from PIL import Image

    pngs = sorted((out / "clip_rgb").glob("*.png"))
    video = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(np.float32) / 255
    assert video.shape == (n, H, W, 3)
    frames = np.stack(list(read_frames(src, 0, n))).astype(np.float32) / 255
    q = quantize_quadmask(np.stack(list(read_frames(mask, 0, n)))[..., 0].astype(np.float32))
    near = torch.nn.functional.max_pool2d(torch.from_numpy((q != 255).astype(np.float32))[:, None], 17, 1, 8)[:, 0]
    far = near.numpy() == 0
    assert np.abs(video - frames)[far].max() <= 1.5 / 255  # kept pixels: the source (png rounding only)
    assert np.abs(video - frames)[q == 0].mean() > 0.05  # the object's pixels were replaced
    # the seam between the shards (frames 16..23, blended by the stitcher): no step there larger than inside
    steps = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))
    assert steps[15:24].max() <= steps[np.r_[0:14, 25 : n - 1]].max(), steps
