"""VOID (Netflix, "Video Object and Interaction Deletion") as a farm model: CogVideoX-Fun inpainting.

A quadmask video says what goes (0 the object, 63 object and affected overlap, 127 what it affects,
255 keep); a background prompt says what the scene looks like without it. Two passes, each computing
what upstream's scripts compute (``predict_v2v.py``, ``inference_with_pass1_warped_noise.py``):

1. ``render`` (pass 1) inpaints one clip. The frames are area-resized to the working size, padded in
   time as upstream pads them (the clip repeated backwards from its last frame up to at least
   ``window_frames`` and to an even latent count), the quadmask coded as VOID was trained (keep 1,
   affected 0.502, overlap and object 0) and encoded by the CogVideoX VAE with the unmasked video;
   the latents are denoised by ``DDIMScheduler`` in temporal windows of ``window_frames`` (each window
   stepped on its own, the stepped windows averaged with upstream's 0.2..0.8 ramps over the
   ``window_overlap``), then decoded on upstream's timeline (the first latent alone, then pairs).
2. ``refine`` (pass 2) denoises again with the pass-2 transformer from Go-with-the-Flow noise
   (``actors/noise_warp.py``) carried along the optical flow (``actors/flow.py``) of the pass-1
   output, with a binary mask (keep 1, everything else 0), CFG and ``CogVideoXDDIMScheduler``. The
   warper's state at the first frame the next shard shares is handed to it, so both shards draw the
   same noise over the seam (upstream stops at one window: its pass 2 fails on longer clips).

The transformer takes ``in_channels = 3 * latent``: noisy latents, the VAE-encoded mask and the
VAE-encoded source video, concatenated on channels.

Weights: a diffusers-format folder ``transformer/`` (pass 1), optional ``transformer_pass2/``,
``vae/``, ``text_encoder/`` (T5), ``tokenizer/``, ``scheduler/``; see ``build_folder`` for making one
from CogVideoX-Fun-V1.5-5b-InP and VOID's ``void_pass1/2.safetensors``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoContext, VideoModel, WindowSpec, check_state
from actors.offload import Offload, memory_mode

QUAD_LEVELS = (0, 63, 127, 255)
MEMORY_MODES = ("full", "model_offload", "sequential")
FLOW_METHODS = ("dis", "raft")
NOISE_AUG_STRENGTH = 0.0563  # upstream pipeline's noise_aug_strength (used when add_noise_in_inpaint_model)
_DTYPES = ("float32", "float16", "bfloat16")
_FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------------------------- pure helpers


def quantize_quadmask(gray: np.ndarray) -> np.ndarray:
    """Snap a decoded (lossy) mask to the four quadmask levels with upstream's thresholds 31/95/191."""
    g = np.asarray(gray, dtype=np.float32)
    return np.select([g <= 31, g <= 95, g <= 191], [0, 63, 127], 255).astype(np.uint8)


def mask_condition(quad: Any, trimask: bool) -> Any:
    """Quadmask levels (a float tensor of 0/63/127/255) -> what the VAE encodes, as upstream codes it.

    ``m = (255 - q) / 255``; pass 1 (trimask) snaps it to 1 (``m > 0.75``), 127/255 (middle) or 0, pass 2
    to ``m > 0.5``; the VAE sees ``1 - c``: pass 1 gives q 0, 63 -> 0, q 127 -> 128/255, q 255 -> 1;
    pass 2 gives q 255 -> 1 and everything else 0."""
    import torch

    m = (255.0 - quad) / 255.0
    if trimask:
        c = torch.where(m > 0.75, torch.ones_like(m), m)
        c = torch.where((c <= 0.75) & (c >= 0.25), torch.full_like(c, 127.0 / 255.0), c)
        c = torch.where(c < 0.25, torch.zeros_like(c), c)
    else:
        c = (m > 0.5).to(m.dtype)
    return 1.0 - c


def working_size(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """The size the model runs at: the source's aspect, at most ``max_area`` pixels (never upscaled),
    each side a multiple of ``multiple`` (VAE stride x patch size)."""
    scale = min(1.0, math.sqrt(max_area / float(height * width)))
    h = max(multiple, int(height * scale / multiple) * multiple)
    w = max(multiple, int(width * scale / multiple) * multiple)
    return h, w


def padded_frames(frames: int, window_frames: int) -> int:
    """Upstream's padded length: the smallest ``4k + 1 >= frames`` with ``k`` odd (an even latent count),
    at least ``window_frames`` (upstream also caps it at 197, reading no more; farm reads the whole clip)."""
    n = (frames // 4) * 4 + 1
    if n < frames:
        n += 4
    if (n // 4) % 2 == 0:
        n += 4
    return max(window_frames, n)


def pad_index(frames: int, target: int) -> np.ndarray:
    """``int [target]``: the clip frame each padded frame shows (the clip, then backwards from its last
    frame, which shows twice, and so on)."""
    idx = np.arange(frames)
    while len(idx) < target:
        idx = np.concatenate([idx, idx[::-1]])
    return idx[:target]


def latent_windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Upstream's temporal multidiffusion windows over ``length`` latents: from 0, each ``window`` long
    (the last one may be shorter), the next starting ``stride`` before the previous one's end."""
    if length <= window:
        return [(0, length)]
    out, start = [], 0
    while True:
        end = min(start + window, length)
        out.append((start, end))
        if end >= length:
            return out
        start = end - stride


def window_weights(windows: list[tuple[int, int]], length: int, stride: int) -> list[np.ndarray]:
    """Upstream's blend weights: ones, the first ``stride`` rising 0.2..0.8 (``linspace(0, 1, stride + 2)``
    without its ends) after a window that starts later than 0, the last ``stride`` falling where the
    window ends before ``length`` (written second)."""
    out = []
    for s, e in windows:
        w = np.ones(e - s, dtype=np.float32)
        if s > 0 and stride > 0:
            w[:stride] = np.linspace(0.0, 1.0, stride + 2, dtype=np.float32)[1:-1]
        if e < length and stride > 0:
            w[-stride:] = np.linspace(1.0, 0.0, stride + 2, dtype=np.float32)[1:-1]
        out.append(w)
    return out


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------- the model


class VOID(VideoModel):
    """Params (upstream's defaults unless said): ``mask`` (quadmask video path/URL) and ``prompt`` (the
    background with the object gone), both usually per video; ``negative_prompt`` (pass 1, unused at
    guidance 1), ``steps`` (pass 1, 30), ``refine_steps`` (pass 2, 50), ``guidance_scale`` (pass 1, 1.0 =
    no CFG), ``refine_guidance_scale`` (pass 2, 6.0, negative prompt ""), ``window_frames`` (85, a 4k+1),
    ``window_overlap`` (16 frames = 4 latents), ``max_area`` (working pixels, 384x672; farm keeps the
    source aspect), ``seed`` (42), ``flow`` (``dis`` offline, or ``raft`` with ``flow_weights``),
    ``noise_scale`` (warp plane over the latent grid, 32 as upstream), ``flow_scale`` (flow resolution
    over the latent grid, 4 as upstream), ``warped_noise`` (a ``noises.npy`` of upstream's
    ``make_warped_noise.py`` to use in pass 2 instead of farm's own, through upstream's loader; the video
    must then be one shard), ``composite`` (farm: keep the source where the quadmask is
    255, off), ``feather``, ``memory`` (full, model_offload or sequential), ``vae_tiling`` (None: only
    with ``memory: sequential``; upstream never tiles)."""

    name: ClassVar[str] = "void"
    window: ClassVar[WindowSpec] = WindowSpec(frames=197, overlap=16, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("rgb",)
    needs_weights: ClassVar[bool] = True
    chunk_frames: ClassVar[int | None] = None
    takes_span: ClassVar[bool] = True
    passes: ClassVar[int] = 2

    def __init__(
        self,
        mask: str | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        steps: int = 30,
        refine_steps: int = 50,
        guidance_scale: float = 1.0,
        refine_guidance_scale: float = 6.0,
        window_frames: int = 85,
        window_overlap: int = 16,
        max_area: int = 384 * 672,
        seed: int = 42,
        flow: str = "dis",
        flow_weights: str | None = None,
        noise_scale: int = 32,
        flow_scale: int = 4,
        warped_noise: str | None = None,
        composite: bool = False,
        feather: int = 4,
        memory: str = "full",
        vae_tiling: bool | None = None,
    ) -> None:
        super().__init__(
            mask=mask,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            refine_steps=refine_steps,
            guidance_scale=guidance_scale,
            refine_guidance_scale=refine_guidance_scale,
            window_frames=window_frames,
            window_overlap=window_overlap,
            max_area=max_area,
            seed=seed,
            flow=flow,
            flow_weights=flow_weights,
            noise_scale=noise_scale,
            flow_scale=flow_scale,
            warped_noise=warped_noise,
            composite=composite,
            feather=feather,
            memory=memory,
            vae_tiling=vae_tiling,
        )
        memory = memory_mode(memory, "void", MEMORY_MODES)
        if flow not in FLOW_METHODS:
            raise ModelError(f"void: flow must be one of {', '.join(FLOW_METHODS)} (got {flow!r})")
        if flow == "raft" and not flow_weights:
            raise ModelError("void: flow 'raft' needs flow_weights (a torchvision raft_large state dict)")
        if int(steps) < 1 or int(refine_steps) < 1:
            raise ModelError(f"void: steps must be >= 1 (got steps={steps}, refine_steps={refine_steps})")
        if int(window_frames) < 5 or (int(window_frames) - 1) % 4:
            raise ModelError(f"void: window_frames must be 4k+1 frames, at least 5 (got {window_frames})")
        if window_overlap % 4 or not 0 <= int(window_overlap) < int(window_frames) - 1:
            raise ModelError(
                f"void: window_overlap must be a multiple of 4 frames, >= 0 and shorter than the window "
                f"(got {window_overlap} for window_frames {window_frames})"
            )
        if int(noise_scale) < 1 or int(flow_scale) < 1 or int(noise_scale) % int(flow_scale):
            raise ModelError(
                f"void: noise_scale and flow_scale must be >= 1, flow_scale dividing noise_scale "
                f"(got {noise_scale}, {flow_scale})"
            )
        if int(max_area) < 256 or int(feather) < 0:
            raise ModelError(f"void: max_area must be >= 256 and feather >= 0 (got {max_area}, {feather})")
        self.mask, self.prompt, self.negative_prompt = mask, str(prompt), str(negative_prompt)
        self.steps, self.refine_steps = int(steps), int(refine_steps)
        self.guidance_scale, self.refine_guidance_scale = float(guidance_scale), float(refine_guidance_scale)
        self.window_frames, self.window_overlap = int(window_frames), int(window_overlap)
        self.max_area, self.seed = int(max_area), int(seed)
        self.flow, self.flow_weights = flow, flow_weights
        self.noise_scale, self.flow_scale = int(noise_scale), int(flow_scale)
        self.warped_noise_url = warped_noise
        self.composite, self.feather = bool(composite), int(feather)
        self.memory = memory
        self.vae_tiling = (memory == "sequential") if vae_tiling is None else bool(vae_tiling)
        self.device, self.dtype = "cpu", "float32"
        self.transformer: Any = None
        self.transformer2: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.tokenizer: Any = None
        self.scheduler_config: dict[str, Any] = {}
        self.add_noise_in_inpaint = False  # transformer/config.json's add_noise_in_inpaint_model
        self.offload = Offload(memory, "cpu", self._components)  # where components live and when they move

    # ------------------------------------------------------------------ weights

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """Load the components from a diffusers-format folder (see the module docstring)."""
        import torch

        if not weights:
            raise ModelError("void: needs weights (a diffusers-format folder: transformer/, vae/, text_encoder/, ...)")
        folder = Path(weights)
        if not folder.is_dir():
            raise ModelError(
                f"void: weights {weights!r} is not a folder (expected {', '.join(f + '/' for f in _FOLDERS)})"
            )
        missing = [f for f in _FOLDERS if not (folder / f).is_dir()]
        if missing:
            raise ModelError(f"void: weights folder {weights!r} lacks {', '.join(f + '/' for f in missing)}")
        if dtype not in _DTYPES:
            raise ModelError(f"void: dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        tdt = getattr(torch, dtype)
        self.vae = self._from_pretrained(AutoencoderKLCogVideoX, folder / "vae", tdt)
        self.transformer = self._from_pretrained(CogVideoXTransformer3DModel, folder / "transformer", tdt)
        second = folder / "transformer_pass2"
        self.transformer2 = (
            self._from_pretrained(CogVideoXTransformer3DModel, second, tdt) if second.is_dir() else self.transformer
        )
        lat = self.vae.config.latent_channels
        for tr, sub in ((self.transformer, "transformer"), (self.transformer2, "transformer_pass2")):
            if tr.config.in_channels != 3 * lat or tr.config.out_channels != lat:
                raise ModelError(
                    f"void: {sub}/ has in_channels={tr.config.in_channels}, out_channels={tr.config.out_channels}; "
                    f"VOID's inpaint layout needs {3 * lat} in (latent + VAE mask + VAE video) and {lat} out"
                )
        try:
            self.text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=tdt).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        except (OSError, ValueError, ImportError) as e:
            raise ModelError(
                f"void: cannot load text_encoder/ or tokenizer/ of {weights!r}: {str(e).splitlines()[0]}"
            ) from e
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"void: cannot read {cfg_path}: {e}") from e
        self.scheduler_config = cfg  # pass 1 builds DDIMScheduler from it, pass 2 CogVideoXDDIMScheduler (upstream)
        try:
            tcfg = json.loads((folder / "transformer" / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"void: cannot read {folder / 'transformer' / 'config.json'}: {e}") from e
        self.add_noise_in_inpaint = bool(tcfg.get("add_noise_in_inpaint_model", False))
        if self.vae_tiling:
            self.vae.enable_tiling()
        self.device, self.dtype = device, dtype
        self.offload.device = device
        self.offload.place()

    @staticmethod
    def _from_pretrained(cls: Any, path: Path, tdt: Any) -> Any:
        """``from_pretrained`` that refuses a checkpoint not matching its config (diffusers only warns)."""
        try:
            model, info = cls.from_pretrained(path, torch_dtype=tdt, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"void: cannot load {path}: {str(e).splitlines()[0]}") from e
        bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
        if bad:
            raise ModelError(f"void: {path} does not fit its config ({len(bad)} missing/mismatched, e.g. {bad[0]})")
        return model.eval()

    def _components(self) -> list[Any]:
        comps = [self.text_encoder, self.vae, self.transformer]
        return comps + ([self.transformer2] if self.transformer2 is not self.transformer else [])

    @property
    def offload_moves(self) -> int:
        """Component or submodule moves the memory mode has made (0 under ``full`` and on the CPU)."""
        return self.offload.moves

    def memory_bytes(self) -> int:
        return self.offload.resident_bytes() if self.transformer is not None else 0

    def _need(self) -> None:
        if self.transformer is None:
            raise ModelError("void: load() the weights before prepare/render")

    # ------------------------------------------------------------------ per video

    def prepare(self, video: VideoContext) -> dict[str, Any]:
        """Check the quadmask video against the source and encode the prompt(s) once per video."""
        self._need()
        mask = video.params.get("mask", self.mask)
        prompt = str(video.params.get("prompt", self.prompt) or "")
        if not mask:
            raise ModelError(
                "void: needs a quadmask video (param 'mask': path or URL; 0 remove, 63 overlap, 127 affected, 255 keep)"
            )
        from farm.storage import redact
        from farm.video import VideoError, probe

        try:
            info = probe(str(mask), video.storage_options)
        except (VideoError, OSError, ValueError) as e:
            raise ModelError(f"void: cannot read quadmask {redact(str(mask), video.storage_options)!r}: {e}") from e
        if info.frame_count < video.frame_count:
            raise ModelError(
                f"void: quadmask {redact(str(mask), video.storage_options)!r} has {info.frame_count} frames, "
                f"the video has {video.frame_count}"
            )
        cond: dict[str, Any] = {
            "mask": str(mask),
            "storage_options": dict(video.storage_options),
            "prompt_embeds": self.encode_prompt(prompt),
            "frame_count": int(video.frame_count),
        }
        noise_url = video.params.get("warped_noise", self.warped_noise_url)
        if noise_url:
            cond["warped_noise"] = self.read_warped_noise(str(noise_url), video.storage_options)
        if self.guidance_scale > 1.0:
            cond["negative_embeds"] = self.encode_prompt(str(video.params.get("negative_prompt", self.negative_prompt)))
        if self.refine_guidance_scale > 1.0:
            cond["empty_embeds"] = self.encode_prompt("")  # upstream's pass 2 negative prompt
        return cond

    def read_warped_noise(self, url: str, storage_options: dict[str, Any]) -> np.ndarray:
        """A ``noises.npy`` (``[T, h, w, 16]`` or ``[T, 16, h, w]``, float16 or float32) read without pickles."""
        import io

        from farm.storage import read_bytes, redact

        try:
            arr = np.load(io.BytesIO(read_bytes(url, storage_options)), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ModelError(f"void: cannot read warped_noise {redact(url, storage_options)!r}: {e}") from e
        lat = self.vae.config.latent_channels
        if arr.ndim != 4 or lat not in (arr.shape[1], arr.shape[3]) or arr.dtype not in (np.float16, np.float32):
            raise ModelError(
                f"void: warped_noise {redact(url, storage_options)!r} must be float [T, h, w, {lat}] noise "
                f"(got {arr.dtype} {arr.shape})"
            )
        return arr

    def encode_prompt(self, text: str) -> np.ndarray:
        """``float32 [seq, dim]`` T5 embedding, padded to the transformer's text length."""
        import torch

        self._need()
        n = int(self.transformer.config.max_text_seq_length)
        ids = self.tokenizer(
            [text], padding="max_length", max_length=n, truncation=True, add_special_tokens=True, return_tensors="pt"
        ).input_ids
        with torch.inference_mode(), self.offload.use(self.text_encoder) as te:
            emb = te(ids.to(self.offload.execution_device))[0]
        return emb[0].float().cpu().numpy()

    # ------------------------------------------------------------------ pass 1

    def render(
        self, frames: np.ndarray, cond: Any, state: State | None, span: tuple[int, int] | None = None
    ) -> tuple[Outputs, State | None]:
        """Pass 1 over one clip: ``uint8 [T, H, W, 3]`` -> ``{"rgb": float32 [T, H, W, 3]}``; no state."""
        self._need()
        frames = self._check_frames(frames, span)
        if len(frames) == 0:
            return {"rgb": np.zeros((*frames.shape[:3], 3), dtype=np.float32)}, None
        span = span or (0, len(frames))
        gray = self.read_quadmask(cond, span, frames.shape[1:3])
        noise = self.initial_noise(len(frames), frames.shape[1:3], span[0])
        return {"rgb": self.inpaint(frames, gray, cond, noise, second=False)}, None

    def initial_noise(self, frames: int, size: tuple[int, int], start: int) -> Any:
        """Pass 1's initial latents: one ``randn`` of the clip's latent shape from a CPU generator seeded
        ``seed`` (upstream's draw; on CUDA upstream draws from a CUDA generator, other numbers), or, for a
        clip that does not start the video, seeded by ``seed`` and the clip's first frame."""
        import torch

        seed = self.seed if start == 0 else _seed(self.seed, 1, start)
        return torch.randn(self.latent_shape(frames, *size), generator=torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------------ pass 2

    def refine(
        self,
        frames: np.ndarray,
        previous: Outputs,
        cond: Any,
        state: State | None,
        span: tuple[int, int],
        shared_prev: int,
        shared_next: int,
    ) -> tuple[Outputs, State | None]:
        """Pass 2 over one shard from Go-with-the-Flow noise warped along the flow of ``previous["rgb"]``
        (pass 1, as stitched).

        ``state`` in: ``{"warp": float32 [1 + C, h*s, w*s]}``, the warper (weights, noise plane) at this
        shard's first frame as shard i-1 left it; without it the plane starts from fresh noise. The returned
        state is the warper at frame ``T - shared_next`` (None when ``shared_next`` is 0)."""
        import torch

        self._need()
        frames = self._check_frames(frames, span)
        t = len(frames)
        prev = np.asarray(previous.get("rgb") if isinstance(previous, dict) else None)
        if prev.ndim != 4 or prev.shape[:3] != frames.shape[:3] or prev.shape[3] != 3:
            raise ModelError(
                f"void: refine needs previous['rgb'] float [T, H, W, 3] matching the frames {frames.shape}"
            )
        if not 0 <= shared_prev <= t or not 0 <= shared_next <= t:
            raise ModelError(
                f"void: shared_prev={shared_prev} / shared_next={shared_next} outside the shard's {t} frames"
            )
        if t == 0:
            return {"rgb": np.zeros((*frames.shape[:3], 3), dtype=np.float32)}, None
        _, _, c, hl, wl = self.latent_shape(t, *frames.shape[1:3])
        start_state = None
        if state is not None and shared_prev > 0:
            check_state(state, {"warp": (1 + c, hl * self.noise_scale, wl * self.noise_scale)}, self.name)
            start_state = torch.from_numpy(np.asarray(state["warp"], dtype=np.float32))
        if cond.get("warped_noise") is not None:  # upstream's noises.npy, through upstream's loader
            from actors.noise_warp import load_warped_noise

            if span != (0, cond.get("frame_count", t)):
                raise ModelError(
                    f"void: warped_noise covers the whole video, but this shard is frames {span}: "
                    "render the video as one shard (window.frames >= its frame count)"
                )
            n_lat = self.latent_shape(t, *frames.shape[1:3])[1]
            noise, handoff = load_warped_noise(cond["warped_noise"], (n_lat, hl, wl, c)), None
        else:
            per_frame, handoff = self.warped_noise(prev, span[0], start_state, t - shared_next if shared_next else None)
            noise = self.pick_latent_noise(per_frame)
        gray = self.read_quadmask(cond, span, frames.shape[1:3])
        out = self.inpaint(frames, gray, cond, noise, second=True)
        return {"rgb": out}, ({"warp": handoff.numpy()} if handoff is not None else None)

    def warped_noise(self, video: np.ndarray, start: int, state: Any = None, handoff_at: int | None = None) -> Any:
        """Go-with-the-Flow noise for every padded frame of a clip: ``(float32 [F, C, h, w], state)``.

        ``video`` is the pass-1 output ``float [T, H, W, 3]`` in [0, 1], padded in time like the clip. The
        flow is estimated between consecutive frames at ``flow_scale`` x the latent grid, the noise plane is
        warped at ``noise_scale`` x the latent grid and area-downscaled to it (upstream's ratios: flow at
        240x360, warp at 1920x2880, latents 60x90). Frame ``k``'s regaussianisation is seeded by ``seed``
        and the video frame index, so a shard resuming from ``state`` redoes its shared frames exactly.
        ``state`` is returned for frame ``handoff_at`` (None if not asked)."""
        import torch
        import torch.nn.functional as F

        from actors.flow import estimate_flow
        from actors.noise_warp import NoiseWarper, downscale

        t = len(video)
        _, n_lat, c, hl, wl = self.latent_shape(t, *video.shape[1:3])
        f_pad = (n_lat - 1) * 4 + 1
        x = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)).permute(0, 3, 1, 2)
        size = (hl * self.flow_scale, wl * self.flow_scale)
        x = F.interpolate(x, size=size, mode="area") if tuple(x.shape[-2:]) != size else x
        x = x[torch.from_numpy(pad_index(t, f_pad))].to(self.device)
        if state is not None:
            warper = NoiseWarper.from_state(state.to(self.device))
        else:
            gen = torch.Generator().manual_seed(_seed(self.seed, 2, start))
            noise = torch.randn(c, hl * self.noise_scale, wl * self.noise_scale, generator=gen)
            warper = NoiseWarper(c, *noise.shape[1:], self.device, noise=noise)
        out = torch.empty(f_pad, c, hl, wl)
        handoff, flows, base = None, torch.empty(0), 0
        for k in range(f_pad):
            if k > 0:
                if k - 1 >= base + len(flows):  # flows of the next 16 frame pairs: bounded memory
                    base, end = k - 1, min(f_pad - 1, k + 15)
                    with torch.inference_mode():
                        pair = (x[base:end], x[base + 1 : end + 1])
                        flows = estimate_flow(*pair, method=self.flow, weights=self.flow_weights)
                key = (3, start + k) if k < t else (4, start + k)  # padding frames draw apart from real ones
                gen = torch.Generator(device=self.device).manual_seed(_seed(self.seed, *key))
                warper(flows[k - 1 - base, 0], flows[k - 1 - base, 1], generator=gen)
            if k == handoff_at:
                handoff = warper.state().cpu().clone()
            out[k] = downscale(warper.noise, self.noise_scale).cpu()
        return out.half().float(), handoff  # upstream stores noises.npy as float16: the model sees that rounding

    def pick_latent_noise(self, per_frame: Any) -> Any:
        """``[F, C, h, w]`` per padded frame -> ``[1, L, C, h, w]``: latent ``k`` takes the frame upstream
        gives it (the pass-1 video resampled to 72 frames, then ``linspace`` over those)."""
        from actors.noise_warp import upstream_frame_picks

        n_lat = (per_frame.shape[0] - 1) // 4 + 1
        return per_frame[upstream_frame_picks(per_frame.shape[0], n_lat)][None].clone()

    # ------------------------------------------------------------------ shared machinery

    def _check_frames(self, frames: np.ndarray, span: tuple[int, int] | None) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ModelError(f"void: frames must be uint8 [T, H, W, 3] RGB (got {frames.dtype} {frames.shape})")
        if span is not None and span[1] - span[0] != len(frames):
            raise ModelError(f"void: span {span} does not match the {len(frames)} frames given")
        return frames

    def _geometry(self, height: int, width: int) -> tuple[int, int, int]:
        """(working h, w, VAE spatial stride)."""
        stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = working_size(height, width, self.max_area, stride * self.transformer.config.patch_size)
        return h, w, stride

    def latent_window(self) -> tuple[int, int]:
        """(latents per window, latents two windows share): ``(window_frames - 1) // 4 + 1``, less one when
        the transformer's temporal patch does not divide it (the pipeline trims it so), and the overlap / 4."""
        p_t = self.transformer.config.patch_size_t
        win = (self.window_frames - 1) // 4 + 1
        if p_t and win % p_t:
            win -= win % p_t
        return max(1, win), self.window_overlap // 4

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        h, w, stride = self._geometry(height, width)
        f = padded_frames(frames, self.window_frames)
        return (1, (f - 1) // 4 + 1, self.vae.config.latent_channels, h // stride, w // stride)

    def read_quadmask(self, cond: Any, span: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """``float32 [T, H, W]``: the quadmask video's first channel for frames ``span`` at the frames' size
        (levels are snapped after the resize to the working size, as upstream snaps them)."""
        import torch
        import torch.nn.functional as F

        from farm.storage import redact
        from farm.video import VideoError, read_frames

        if not cond or "mask" not in cond:
            raise ModelError("void: no quadmask for this video (prepare() was not run)")
        url, so = cond["mask"], cond.get("storage_options") or {}
        try:
            m = np.stack(list(read_frames(url, span[0], span[1], storage_options=so)))
        except (VideoError, OSError, ValueError) as e:
            raise ModelError(
                f"void: cannot read quadmask {redact(url, so)!r} frames [{span[0]}, {span[1]}): {e}"
            ) from e
        gray = m[..., 0].astype(np.float32)  # [T, h, w]
        if gray.shape[1:] != tuple(size):
            gray = F.interpolate(torch.from_numpy(gray)[:, None], size=tuple(size), mode="area")[:, 0].numpy()
        return gray

    def encode_inputs(self, frames: np.ndarray, gray: np.ndarray, second: bool) -> tuple[Any, Any]:
        """(video latents, mask latents), each ``[1, L, C, h/8, w/8]``: the clip area-resized to the working
        size and padded in time, the video encoded as ``x * 2 - 1`` (plus upstream's noise augmentation when
        the transformer config asks), the quadmask coded for pass 1 (``second`` False) or pass 2."""
        import torch
        import torch.nn.functional as F

        t, height, width = frames.shape[:3]
        h, w, _ = self._geometry(height, width)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
        q = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[:, None]  # [T, 1, H, W]
        if (h, w) != (height, width):
            x = F.interpolate(x, size=(h, w), mode="area")
            q = F.interpolate(q, size=(h, w), mode="area")
        q = torch.from_numpy(quantize_quadmask(q.numpy()).astype(np.float32))
        idx = torch.from_numpy(pad_index(t, padded_frames(t, self.window_frames)))
        video = x[idx] * 2.0 - 1.0
        if self.add_noise_in_inpaint:  # upstream: sigma * N(0, 1) from the global RNG; here a seeded generator
            gen = torch.Generator().manual_seed(_seed(self.seed, 5, t))
            aug = torch.randn(video.shape, generator=gen) * NOISE_AUG_STRENGTH
            video = video + torch.where(video == -1, torch.zeros_like(aug), aug)
        maskin = mask_condition(q[idx], trimask=not second).expand(-1, 3, -1, -1)
        with torch.inference_mode():
            return self._encode(video), self._encode(maskin)

    def inpaint(self, frames: np.ndarray, gray: np.ndarray, cond: Any, noise: Any, second: bool) -> np.ndarray:
        """One pass over one clip from ``noise`` (``[1, L, C, h, w]``): encode, denoise, decode, keep the
        clip's frames, resize back to the source size (and composite): ``float32 [T, H, W, 3]`` in [0, 1]."""
        import torch
        import torch.nn.functional as F

        t, height, width = frames.shape[:3]
        h, w, _ = self._geometry(height, width)
        vid_lat, mask_lat = self.encode_inputs(frames, gray, second)
        if vid_lat.shape[1] != noise.shape[1]:
            raise ModelError(f"void: the VAE made {vid_lat.shape[1]} latent frames, the noise has {noise.shape[1]}")
        latents = self.denoise(noise, torch.cat([mask_lat, vid_lat], dim=2), cond, second, h, w)
        with torch.inference_mode():
            dec = self.decode(latents)[:t].cpu()  # [T, 3, h, w] in [0, 1]
            if (h, w) != (height, width):
                dec = F.interpolate(dec, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
            out = dec.permute(0, 2, 3, 1).contiguous()  # [T, H, W, 3]
            if self.composite:
                src = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
                alpha = self.composite_alpha(quantize_quadmask(gray))[..., None]
                out = src * (1.0 - alpha) + out * alpha
        return out.numpy().astype(np.float32)

    def composite_alpha(self, quad: np.ndarray) -> Any:
        """``float [T, H, W]``: 1 on what the quadmask changes (< 255), 0 further than 2*feather px from it."""
        import torch
        import torch.nn.functional as F

        change = torch.from_numpy((quad != 255).astype(np.float32))[:, None]
        f = self.feather
        if f > 0:
            change = F.max_pool2d(change, 2 * f + 1, stride=1, padding=f)
            change = F.avg_pool2d(change, 2 * f + 1, stride=1, padding=f, count_include_pad=False)
        return change[:, 0]

    def _vae_device(self) -> Any:
        return self.offload.execution_device

    def _encode(self, pixels: Any) -> Any:
        """``[F, 3, h, w]`` -> scaled latents ``[1, L, C, h/8, w/8]`` (the distribution's mode)."""
        import torch

        with self.offload.use(self.vae) as vae:
            z = pixels.permute(1, 0, 2, 3)[None].to(self._vae_device(), getattr(torch, self.dtype))
            lat = vae.encode(z).latent_dist.mode() * vae.config.scaling_factor
        return lat.float().to(self.device).permute(0, 2, 1, 3, 4)

    def decode(self, latents: Any) -> Any:
        """``[1, L, C, h, w]`` -> ``float [F, 3, 8h, 8w]`` in [0, 1], ``F = 4(L - 1) + 1``, on upstream's
        timeline: latent 0 decoded alone (one frame), then latents (1, 2), (3, 4), ... to 8 frames each and a
        trailing single latent to 4, the causal cache carried. Where ``vae_tiling`` really tiles (latents
        larger than a tile) diffusers' tiled decode runs instead (pairs (0, 1), (2, 3), ...: another frame
        alignment; see the README)."""
        import torch

        with torch.inference_mode(), self.offload.use(self.vae) as vae:
            z = (1 / vae.config.scaling_factor * latents).permute(0, 2, 1, 3, 4)
            z = z.to(self._vae_device(), getattr(torch, self.dtype))
            f = 4 * (z.shape[2] - 1) + 1
            tiles = self.vae_tiling and (
                z.shape[-1] > vae.tile_latent_min_width or z.shape[-2] > vae.tile_latent_min_height
            )
            dec = vae.decode(z).sample if tiles else _decode_upstream(vae, z)
            return (dec[0, :, :f].float() / 2 + 0.5).clamp(0, 1).permute(1, 0, 2, 3)

    def _rope(self, transformer: Any, h: int, w: int, frames: int) -> Any:
        if not transformer.config.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        cfg = transformer.config
        stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        gh, gw = h // (stride * cfg.patch_size), w // (stride * cfg.patch_size)
        bh, bw = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
        if cfg.patch_size_t is None:
            coords = get_resize_crop_region_for_grid((gh, gw), bw, bh)
            return get_3d_rotary_pos_embed(cfg.attention_head_dim, coords, (gh, gw), frames, device=self.device)
        if gh > bh or gw > bw:
            raise ModelError(f"void: working size {h}x{w} exceeds the transformer's RoPE grid ({bh}x{bw} patches)")
        return get_3d_rotary_pos_embed(
            cfg.attention_head_dim,
            None,
            (gh, gw),
            (frames + cfg.patch_size_t - 1) // cfg.patch_size_t,
            grid_type="slice",
            max_size=(bh, bw),
            device=self.device,
        )

    def denoise(self, noise: Any, inpaint: Any, cond: Any, second: bool, h: int, w: int) -> Any:
        """Upstream's denoising loop. Pass 1: ``DDIMScheduler``, ``steps``, ``guidance_scale``; pass 2:
        ``CogVideoXDDIMScheduler``, ``refine_steps``, ``refine_guidance_scale`` with the empty negative
        prompt. Clips longer than one window: every step, each window is predicted and stepped on its own
        slice, and the stepped windows are averaged with ``window_weights``."""
        import torch
        from diffusers import CogVideoXDDIMScheduler, DDIMScheduler

        dev = torch.device(self.device)
        tdt = getattr(torch, self.dtype)
        transformer = self.transformer2 if second else self.transformer
        guidance = self.refine_guidance_scale if second else self.guidance_scale
        steps = self.refine_steps if second else self.steps
        n_lat = noise.shape[1]
        win, stride = self.latent_window()
        windows = latent_windows(n_lat, win, stride)
        p_t = transformer.config.patch_size_t or 1
        if any((e - s) % p_t for s, e in windows):
            raise ModelError(
                f"void: latent windows {windows} of a {n_lat}-latent clip: each must be a multiple of the "
                f"transformer's temporal patch {p_t} (choose window_frames/window_overlap that keep them so)"
            )
        weights = [torch.from_numpy(x).to(dev).view(1, -1, 1, 1, 1) for x in window_weights(windows, n_lat, stride)]
        emb = torch.from_numpy(np.asarray(cond["prompt_embeds"], dtype=np.float32))[None].to(dev, tdt)
        cfg = guidance > 1.0
        if cfg:
            key = "empty_embeds" if second else "negative_embeds"
            if key not in cond:
                raise ModelError(f"void: guidance > 1 needs {key} in cond (prepare() ran with guidance 1)")
            neg = torch.from_numpy(np.asarray(cond[key], dtype=np.float32))[None].to(dev, tdt)
            emb = torch.cat([neg, emb])
        sched = (CogVideoXDDIMScheduler if second else DDIMScheduler).from_config(self.scheduler_config)
        sched.set_timesteps(steps, device=dev)
        latents = (noise.to(dev, torch.float32) * sched.init_noise_sigma).to(tdt)
        inpaint = inpaint.to(dev, tdt)
        ofs = None
        if getattr(transformer.config, "ofs_embed_dim", None):
            ofs = torch.full((emb.shape[0],), 2.0, device=dev)
        ropes: dict[int, Any] = {}

        def sample(tr: Any, x: Any, inp: Any, t: Any) -> Any:
            if x.shape[1] not in ropes:
                ropes[x.shape[1]] = self._rope(tr, h, w, x.shape[1])
            model_in = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            hidden = torch.cat([model_in, torch.cat([inp, inp]) if cfg else inp], dim=2).to(tdt)
            pred = tr(
                hidden_states=hidden,
                encoder_hidden_states=emb,
                timestep=t.expand(hidden.shape[0]).to(dev),
                image_rotary_emb=ropes[x.shape[1]],
                ofs=ofs,
                return_dict=False,
            )[0].float()
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            return sched.step(pred, t, x, return_dict=False)[0].to(tdt)

        with torch.inference_mode(), self.offload.use(transformer) as tr:
            for t in sched.timesteps:
                if len(windows) == 1:
                    latents = sample(tr, latents, inpaint, t)
                    continue
                canvas = torch.zeros_like(latents, dtype=torch.float32)
                total = torch.zeros(1, n_lat, 1, 1, 1, device=dev)
                for (s, e), wt in zip(windows, weights, strict=True):
                    canvas[:, s:e] += sample(tr, latents[:, s:e], inpaint[:, s:e], t) * wt
                    total[:, s:e] += wt
                latents = (canvas / total).to(tdt)
        return latents.float()


def _decode_upstream(vae: Any, z: Any) -> Any:
    """``vae.decoder`` over latent 0 alone, then pairs, the cache carried; a trailing single latent is
    doubled in time as a pair's would be (diffusers' upsampler keeps a lone frame single)."""
    import torch

    n = z.shape[2]
    chunks = [(0, 1)] + [(s, min(s + 2, n)) for s in range(1, n, 2)]
    cache, out = None, []
    for i, (s, e) in enumerate(chunks):
        zi = z[:, :, s:e]
        if vae.post_quant_conv is not None:
            zi = vae.post_quant_conv(zi)
        with _time_doubling(vae.decoder, i > 0 and e - s == 1):
            zi, cache = vae.decoder(zi, conv_cache=cache)
        out.append(zi)
    return torch.cat(out, dim=2)


@contextmanager
def _time_doubling(decoder: Any, active: bool) -> Iterator[None]:
    """While active, the decoder's time-compressing upsamplers double a single frame in time too."""
    if not active:
        yield
        return
    import torch.nn.functional as F

    patched = []
    for mod in decoder.modules():
        if type(mod).__name__ == "CogVideoXUpsample3D" and getattr(mod, "compress_time", False):

            def forward(inputs: Any, _m: Any = mod) -> Any:
                x = F.interpolate(inputs, scale_factor=2.0)  # [b, c, 2t, 2h, 2w], nearest
                b, c, t, h, w = x.shape
                x = _m.conv(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
                return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)

            mod.forward = forward
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


# ---------------------------------------------------------------------------------------------- folder builder


def build_folder(base: str, pass1: str, out: str, pass2: str | None = None) -> Path:
    """A farm weights folder from CogVideoX-Fun-V1.5-5b-InP (diffusers layout) and VOID's checkpoints.

    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` are linked from ``base``; ``transformer/``
    (and ``transformer_pass2/``) get the base transformer config with ``in_channels`` = 3 x latent and the
    VOID checkpoint as ``diffusion_pytorch_model.safetensors`` (a ``state_dict`` wrapper is unwrapped).
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(base), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        if not (src / sub).is_dir():
            raise ModelError(f"void: base folder {base!r} lacks {sub}/")
        link = dst / sub
        if not link.exists():
            link.symlink_to((src / sub).resolve(), target_is_directory=True)
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    lat = json.loads((src / "vae" / "config.json").read_text()).get("latent_channels", 16)
    cfg["in_channels"] = 3 * lat
    for ckpt, sub in ((pass1, "transformer"), (pass2, "transformer_pass2")):
        if ckpt is None:
            continue
        sd = load_file(ckpt)
        sd = {k.removeprefix("state_dict."): v for k, v in sd.items()}
        d = dst / sub
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return dst
