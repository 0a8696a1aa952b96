"""VideoGrain on tiny random-weight SD1.5-shaped models built from configs: prompt validation, determinism,
mask confinement, anchors shared by every clip, and the inversion cache, through ``farm submit`` on CPU."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from actors.base import ModelError, VideoContext
from actors.videograin import VideoGrain
from farm.encode import SegmentWriter
from farm.spec import SpecError, parse_spec
from farm.video import probe, read_frames

ROOT = Path(__file__).resolve().parents[1]
T, H, W, FPS = 20, 48, 64, 12
WORDS = "a an the two on in of and is are car cars bus red blue truck road man dog cat walking white black".split()
EDIT_A = {"prompt": "a red car and a white dog on the road", "local_prompts": ["a red car", "a white dog"]}
EDIT_B = {"prompt": "a blue truck and a black cat on the road", "local_prompts": ["a blue truck", "a black cat"]}
# flatten_res: [] here: FLATTEN's optical flow comes from actors/flow.py (DIS / RAFT); the test that turns it on
# hands the flow in. keep_background: on for the tests that measure it (upstream's default is off).
TINY = {"steps": 2, "resolution": 16, "guidance": 3.0, "modulated_steps": 2, "anchors": 2, "feather": 2,
        "flatten_res": [], "keep_background": True}


def build_weights(root: Path) -> Path:
    """A diffusers-format folder shaped like SD1.5 + ControlNet, tiny and random (seeded)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="[UNK]",
        model_max_length=16,
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )).save_pretrained(root / "text_encoder")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet.save_pretrained(root / "unet")
    torch.manual_seed(2)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).save_pretrained(root / "controlnet")
    torch.manual_seed(3)
    AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(root / "vae")
    return root


def box(t: int) -> tuple[slice, slice]:
    """Region 0 moves 2 px per frame, so masks read for the wrong frames land elsewhere."""
    return slice(4, 24), slice(2 + 2 * t, 22 + 2 * t)


def region_masks(frames: range) -> np.ndarray:
    """``bool [T, H, W]``: the union of the two regions, as the test wrote them."""
    out = np.zeros((len(frames), H, W), dtype=bool)
    for k, t in enumerate(frames):
        out[k][box(t)] = True
        out[k, 30:46, 40:62] = True
    return out


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """``bool [T, H, W]`` grown by ``r`` px (square)."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.float32))[:, None]
    return F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)[:, 0].numpy() > 0


@pytest.fixture(scope="module")
def media(tmp_path_factory, tiny_weights) -> dict[str, str]:
    d = tmp_path_factory.mktemp("videograin")
    weights = tiny_weights("videograin")
    yy, xx = np.mgrid[0:H, 0:W]
    with SegmentWriter(str(d / "clip.mp4"), Fraction(FPS), W, H, quality=10) as w:
        for t in range(T):
            w.write(np.stack([(xx * 4 + t * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2 + t) % 256], -1).astype(np.uint8))
    (d / "car").mkdir()
    for t in range(T):  # region 0: a folder of PNGs
        m = np.zeros((H, W), np.uint8)
        m[box(t)] = 255
        Image.fromarray(m).save(d / "car" / f"{t:05d}.png")
    with SegmentWriter(str(d / "dog.mp4"), Fraction(FPS), W, H, quality=0) as w:  # region 1: a mask video
        m = np.zeros((H, W, 3), np.uint8)
        m[30:46, 40:62] = 255
        for _ in range(T):
            w.write(m)
    return {"dir": str(d), "weights": str(weights), "video": str(d / "clip.mp4"),
            "masks": [str(d / "car"), str(d / "dog.mp4")]}


def model(media: dict, **params) -> VideoGrain:
    m = VideoGrain(**{**TINY, **params})
    m.load(media["weights"])
    return m


def prepare(m: VideoGrain, media: dict, prompts: dict) -> dict:
    return m.prepare(VideoContext(url=media["video"], frame_count=T, width=W, height=H, fps=FPS,
                                  params={**prompts, "masks": media["masks"]}))


def render(m: VideoGrain, cond: dict, frames: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    out, state = m.render(frames, cond, None, span=span)
    assert state is None
    return out["rgb"]


# ---------------------------------------------------------------- prompt validation (no torch)


def test_prompt_validation_errors_name_the_field_and_word(tmp_path: Path) -> None:
    base = {"prompt": "two cars on the road", "masks": ["a/", "b/"]}
    with pytest.raises(ModelError, match=r"^videograin: local_prompts\[1\]: word 'bus' does not occur in prompt "
                                         r"'two cars on the road'$"):
        VideoGrain.validate_params({**base, "local_prompts": ["two cars", "road bus"]})
    with pytest.raises(ModelError, match=r"local_prompts\[0\]: 'road the' must appear as one phrase"):
        VideoGrain.validate_params({**base, "local_prompts": ["road the", "two cars"]})
    with pytest.raises(ModelError, match=r"masks: 2 masks for 1 local_prompts"):
        VideoGrain.validate_params({**base, "local_prompts": ["two cars"]})
    with pytest.raises(ModelError, match=r"prompt: required"):
        VideoGrain.validate_params({"local_prompts": ["two cars"], "masks": ["a/"]}, complete=True)
    with pytest.raises(ModelError, match=r"stregth: unknown param"):
        VideoGrain.validate_params({"stregth": 0.5})
    VideoGrain.validate_params({**base, "local_prompts": "two cars; the road"})  # a manifest cell: ';'-separated
    for bad, msg in (({"use_pnp": "yes"}, r"^videograin: use_pnp: must be true or false"),
                     ({"flatten_res": [3]}, r"^videograin: flatten_res: must be a list of factors from \[1, 2, 4, 8\]"),
                     ({"flow_method": "farneback"}, r"^videograin: flow_method: must be one of dis, raft"),
                     ({"use_pnp": True, "inject_step": 50}, r"^videograin: inject_step: must be below steps \(50\)"),
                     ({"old_qk": 2}, r"^videograin: old_qk: must be 0 or 1"),
                     ({"b1": -1}, r"^videograin: b1: must be a number in \[0, inf\]"),
                     ({"guidance_scale": 7.5, "guidance": 5},
                      r"^videograin: guidance_scale: the same param as guidance"),
                     ({"num_inference_steps": 0}, r"^videograin: steps: must be an integer in \[1, 1000\]")):
        with pytest.raises(ModelError, match=msg):
            VideoGrain.validate_params(bad)
    VideoGrain.validate_params({"use_pnp": True, "inject_step": 10, "flatten_res": [1, 2, 4], "use_freeu": True,
                                "b1": 1.2, "b2": 1.5, "s1": 1, "s2": 1, "flow_method": "raft",
                                "flow_weights": "/w/raft_large.pth", "guidance_scale": 7.5, "num_inference_steps": 50,
                                "controlnet_conditioning_scale": 0.7})  # upstream's config names

    job = {"name": "vg", "inputs": ["x.mp4"], "output": {"channels": ["rgb"]},
           "model": {"name": "videograin", "params": {**base, "local_prompts": ["two cars", "road bus"]}}}
    with pytest.raises(SpecError) as e:
        parse_spec(yaml.safe_dump(job, sort_keys=False), "jobs/vg.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("jobs/vg.yaml:")
    assert "model.params: videograin: local_prompts[1]: word 'bus' does not occur" in msg

    from click.testing import CliRunner

    from farm.cli import main

    path = tmp_path / "vg.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "word 'bus'" in result.output
    assert CliRunner().invoke(main, ["validate", str(ROOT / "jobs" / "videograin.yaml")]).exit_code == 0


# ---------------------------------------------------------------- in process


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two contending."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_deterministic_confined_and_anchored(media: dict, one_thread) -> None:
    span = (4, 10)
    frames = np.stack(list(read_frames(media["video"], *span)))
    m = model(media, keep_background=False, resolution=32)  # what latent blending alone confines
    cond = prepare(m, media, EDIT_A)
    a = render(m, cond, frames, span)
    assert a.shape == (6, H, W, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, render(m, cond, frames, span))  # same seed, same edit
    assert not np.array_equal(a, render(model(media, keep_background=False, resolution=32, seed=1), cond, frames, span))
    anchored = np.abs(a - render(m, {**cond, "anchors": None}, frames, span)).mean()
    assert anchored > 2e-4, anchored  # the anchors' keys/values change what the clip attends to

    # Changing the prompts changes the regions; outside them the latents are the source's and only the VAE
    # decoder's reach (GroupNorm statistics, convolutions) carries a change out: measured beyond 4 px.
    # The same measure with masks that cover the whole frame is the control.
    inside = region_masks(range(*span))
    far = ~dilate(inside, 4)
    white = Path(media["dir"]) / "white.png"
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(white)
    ratios = []
    for masks in (media["masks"], [str(white)] * 2):
        med = {**media, "masks": masks}
        a, b = (render(m, prepare(m, med, e), frames, span) for e in (EDIT_A, EDIT_B))
        change = np.abs(a - b).mean(-1)
        ratios.append(change[far].mean() / change[inside].mean())
    print(f"prompt change outside/inside: {ratios[0]:.3f} (whole-frame masks: {ratios[1]:.3f}); "
          f"anchors on/off {anchored:.4f}")
    assert ratios[0] < 0.25 and ratios[1] > 2 * ratios[0], ratios


def test_whole_video_clip_skips_anchors_and_flatten_pnp_run_beside_them(media: dict, one_thread) -> None:
    """A clip that is the whole video is upstream's case: no anchors. FLATTEN (flow handed in) and PnP run
    beside the anchors of a longer video, whose keys/values stay those ``prepare`` made."""
    span = (4, 10)
    frames = np.stack(list(read_frames(media["video"], *span)))
    m = model(media, keep_background=False)
    cond = prepare(m, media, EDIT_A)
    short = {**cond, "frame_count": span[1] - span[0]}  # as if the video were these 6 frames
    whole = m.render(frames, short, None)[0]["rgb"]
    assert np.array_equal(whole, m.render(frames, {**short, "anchors": None}, None)[0]["rgb"])

    flows = []

    def flow(frames_m: np.ndarray, p: dict) -> np.ndarray:  # 1 px right per frame at model size
        flows.append(frames_m.shape)
        f = np.zeros((len(frames_m) - 1, 2, *frames_m.shape[1:3]), np.float32)
        f[:, 0] = 8.0
        return f

    outs = {}
    for name, extra in (("plain", {}), ("flatten", {"flatten_res": [1, 2]}),
                        ("flatten_pnp", {"flatten_res": [1, 2], "use_pnp": True, "inject_step": 1})):
        mm = model(media, keep_background=False, **extra)
        mm.flow = flow
        c = prepare(mm, media, EDIT_A)
        outs[name] = render(mm, c, frames, span)
        assert np.allclose(mm.ctx.fingerprint, c["anchors"]["fingerprint"], rtol=1e-5), name
    assert flows and all(s == (6, *m.model_size(H, W), 3) for s in flows)  # the clip's frames at model size
    moved = {k: float(np.abs(outs[k] - outs["plain"]).mean()) for k in ("flatten", "flatten_pnp")}
    print(f"FLATTEN moves the edit by {moved['flatten']:.4f}, + PnP by {moved['flatten_pnp']:.4f}")
    assert moved["flatten"] > 1e-4 and abs(moved["flatten_pnp"] - moved["flatten"]) > 1e-5, moved


# ---------------------------------------------------------------- through farm submit


def _job(media: dict, out: str, prompts: dict, trace: str, fmt: str, actors: int) -> dict:
    return {
        "name": "videograin",
        "inputs": [media["video"]],
        "model": {"name": "videograin", "weights": media["weights"], "device": "cpu",
                  "params": {**TINY, **prompts, "masks": media["masks"], "cache": f"{media['dir']}/cache",
                             "trace": trace}},
        "window": {"frames": 8, "overlap": 2},
        "output": {"uri": out, "channels": ["rgb"], "format": fmt},
        "resources": {"actors": actors, "cpus_per_actor": 1},
    }


def _traces(folder: str) -> tuple[dict, dict[tuple[int, int], dict]]:
    files = sorted(Path(folder).glob("*.json"))
    clips = {tuple(r["span"]): r for r in (json.loads(f.read_text()) for f in files if f.name.startswith("clip-"))}
    return json.loads((Path(folder) / "prepare.json").read_text()), clips


def test_farm_submit_clips_share_anchors_and_reuse_inversions(ray_session, media: dict) -> None:
    from farm.driver import run_job

    d = media["dir"]
    spans = [(0, 8), (6, 14), (12, 20)]  # window 8, overlap 2 over 20 frames

    first = run_job(parse_spec(yaml.safe_dump(_job(media, f"{d}/out/{{stem}}_a.mp4", EDIT_A, f"{d}/trace_a",
                                                   "mp4", actors=2)), "x.yaml"))
    assert first.ok, first.manifest
    (video,) = first.manifest["videos"].values()
    got = probe(video["outputs"]["rgb"]["url"])
    assert (got.frame_count, got.width, got.height, got.fps) == (T, W, H, Fraction(FPS))  # the source's
    prep, clips = _traces(f"{d}/trace_a")
    assert sorted(clips) == spans and prep["inverted"]
    for span, rec in clips.items():  # every clip attended to the anchors' keys/values that prepare made
        assert rec["inverted"], span
        assert rec["anchor_id"] == prep["anchor_id"]
        assert rec["fingerprint"] is not None
        assert np.allclose(rec["fingerprint"], prep["fingerprint"], rtol=1e-5), (span, rec, prep)

    # A new prompt on the same video: every inversion (clips and anchors) comes from the cache.
    second = run_job(parse_spec(yaml.safe_dump(_job(media, f"{d}/out/{{stem}}_b", EDIT_B, f"{d}/trace_b",
                                                    "png", actors=1)), "x.yaml"))
    assert second.ok, second.manifest
    prep_b, clips_b = _traces(f"{d}/trace_b")
    assert not prep_b["inverted"] and prep_b["xT_sha"] == prep["xT_sha"]
    for span in spans:
        assert not clips_b[span]["inverted"] and clips_b[span]["xT_sha"] == clips[span]["xT_sha"], span
    assert len(list(Path(d, "cache").glob("*.npz"))) == len(spans) + 1

    # Outside every mask (beyond the feather) the output is the source's pixels; inside, the edit.
    (video_b,) = second.manifest["videos"].values()
    out = np.stack([np.asarray(Image.open(p)) for p in sorted(Path(video_b["outputs"]["rgb"]["url"]).glob("*.png"))])
    src = np.stack(list(read_frames(media["video"], 0, T)))
    assert out.shape == src.shape == (T, H, W, 3)
    inside = region_masks(range(T))
    far = ~dilate(inside, TINY["feather"] + 1)
    change = np.abs(out.astype(np.float32) - src).mean(-1) / 255
    print(f"kept background: change outside {change[far].mean():.5f}, inside {change[inside].mean():.4f}")
    assert change[far].max() <= 1 / 255 and change[inside].mean() > 0.05
