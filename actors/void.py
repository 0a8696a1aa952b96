"""VOID (Netflix, "Video Object and Interaction Deletion") as a farm model: CogVideoX-Fun inpainting.

A quadmask video says what goes (0 the object, 63 object and affected overlap, 127 what it affects,
255 keep); a background prompt says what the scene looks like without it. Two passes:

1. ``render`` (pass 1) inpaints one clip: the frames are resized to the working size (aspect kept,
   sides a multiple of 16), encoded by the CogVideoX VAE, and denoised in temporal windows of
   ``window_frames`` overlapping by ``window_overlap``; at every step the windows' predictions are
   blended with a ramp over the overlap (DDIM's step is linear in the prediction, so this is the same
   as blending the stepped latents, and it also holds for multistep schedulers), then decoded and
   resized back to the source size. Clips of a long video are blended by farm's stitcher.
2. ``refine`` (pass 2) re-runs the inpainting from *warped noise*: optical flow of the pass-1 output
   (``actors/flow.py``) carries one Gaussian noise field from frame to frame (Go-with-the-Flow style,
   nearest-neighbour transport at ``noise_scale`` x the latent resolution, fresh noise where content
   enters the frame), pooled down to the latent grid. The noise of the frames a shard shares with the
   next one is its state, so shard i+1 continues shard i's noise field and the seam sees one noise.

The transformer takes ``in_channels = 3 * latent``: noisy latents, the VAE-encoded mask (``1 - q/255``,
three channels, as VOID trains it) and the VAE-encoded source video, concatenated on channels.

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

QUAD_LEVELS = (0, 63, 127, 255)
MEMORY_MODES = ("full", "model_offload", "sequential")
RAMPS = ("linear", "cosine", "none")
_DTYPES = ("float32", "float16", "bfloat16")
_FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


# ---------------------------------------------------------------------------------------------- pure helpers


def quantize_quadmask(gray: np.ndarray) -> np.ndarray:
    """Snap a decoded (lossy) mask to the four quadmask levels with upstream's thresholds 31/95/191."""
    g = np.asarray(gray, dtype=np.float32)
    return np.select([g <= 31, g <= 95, g <= 191], [0, 63, 127], 255).astype(np.uint8)


def working_size(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """The size the model runs at: the source's aspect, at most ``max_area`` pixels (never upscaled),
    each side a multiple of ``multiple`` (VAE stride x patch size)."""
    scale = min(1.0, math.sqrt(max_area / float(height * width)))
    h = max(multiple, int(height * scale / multiple) * multiple)
    w = max(multiple, int(width * scale / multiple) * multiple)
    return h, w


def latent_windows(length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open latent ranges covering ``[0, length)``: full windows advancing by ``window - overlap``,
    the last one moved back to end at ``length`` (so every window has the size the model was run at)."""
    if length <= window:
        return [(0, length)]
    stride = window - overlap
    starts = list(range(0, length - window, stride)) + [length - window]
    return [(s, s + window) for s in starts]


def window_weights(windows: list[tuple[int, int]], kind: str = "linear") -> list[np.ndarray]:
    """Per-window blend weights: a ramp up over the overlap with the previous window, down over the next,
    normalised so that they sum to 1 on every frame (also where a moved last window covers a frame thrice).
    The ramp is sampled at frame centres (never 0 or 1 inside an overlap); ``none`` is a hard cut at
    the middle of each overlap, for comparison."""
    out = []
    for i, (s, e) in enumerate(windows):
        w = np.ones(e - s, dtype=np.float64)
        for side, other in (
            ("left", windows[i - 1] if i else None),
            ("right", windows[i + 1] if i + 1 < len(windows) else None),
        ):
            if other is None:
                continue
            n = (other[1] - s) if side == "left" else (e - other[0])
            if n <= 0:
                continue
            t = (np.arange(n) + 0.5) / n
            if kind == "cosine":
                t = 0.5 - 0.5 * np.cos(np.pi * t)
            elif kind == "none":
                t = (t >= 0.5).astype(np.float64)
            if side == "left":
                w[:n] *= t
            else:
                w[e - s - n :] *= t[::-1]
        out.append(np.maximum(w, 1e-6))  # a hard cut still leaves each frame some weight to divide by
    total = np.zeros(max(e for _, e in windows))
    for (s, e), w in zip(windows, out, strict=True):
        total[s:e] += w
    return [w / total[s:e] for (s, e), w in zip(windows, out, strict=True)]  # a partition of unity


def padded_frames(frames: int, latent_window: int, patch_t: int) -> int:
    """Frames to run (>= ``frames``): 4k+1 for the VAE, and when one window covers the clip, a latent
    count the transformer's temporal patch divides."""
    f = frames + (-(frames - 1) % 4)
    lat = (f - 1) // 4 + 1
    if lat <= latent_window and lat % patch_t:
        f += 4 * (patch_t - lat % patch_t)
    return f


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------- the model


class VOID(VideoModel):
    """Params: ``mask`` (quadmask video path/URL) and ``prompt`` (the background with the object gone),
    both usually per video; ``negative_prompt``, ``steps``, ``refine_steps`` (None = steps),
    ``guidance_scale`` (pass 1, upstream 1.0 = no CFG), ``refine_guidance_scale`` (pass 2, upstream 6.0),
    ``window_frames`` (85), ``window_overlap`` (16), ``window_ramp`` (linear, cosine or none),
    ``max_area`` (working pixels, upstream 384x672), ``seed``, ``noise_scale`` (warped-noise resolution
    over the latent grid), ``noise_mix`` (share of fresh noise mixed into warped noise), ``composite``
    (keep the source where the quadmask is 255), ``feather`` (px of the composite's soft edge),
    ``memory`` (full, model_offload or sequential), ``vae_tiling``."""

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
        steps: int = 50,
        refine_steps: int | None = None,
        guidance_scale: float = 1.0,
        refine_guidance_scale: float = 6.0,
        window_frames: int = 85,
        window_overlap: int = 16,
        window_ramp: str = "linear",
        max_area: int = 384 * 672,
        seed: int = 42,
        noise_scale: int = 4,
        noise_mix: float = 0.0,
        composite: bool = True,
        feather: int = 4,
        memory: str = "full",
        vae_tiling: bool = True,
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
            window_ramp=window_ramp,
            max_area=max_area,
            seed=seed,
            noise_scale=noise_scale,
            noise_mix=noise_mix,
            composite=composite,
            feather=feather,
            memory=memory,
            vae_tiling=vae_tiling,
        )
        if memory not in MEMORY_MODES:
            raise ModelError(f"void: memory must be one of {', '.join(MEMORY_MODES)} (got {memory!r})")
        if window_ramp not in RAMPS:
            raise ModelError(f"void: window_ramp must be one of {', '.join(RAMPS)} (got {window_ramp!r})")
        if int(steps) < 1 or (refine_steps is not None and int(refine_steps) < 1):
            raise ModelError(f"void: steps must be >= 1 (got steps={steps}, refine_steps={refine_steps})")
        if int(window_frames) < 5:
            raise ModelError(f"void: window_frames must be >= 5 (got {window_frames})")
        if not 0 <= int(window_overlap) < int(window_frames) - 4:
            raise ModelError(
                f"void: window_overlap must be >= 0 and leave the window room to advance "
                f"(got {window_overlap} for window_frames {window_frames})"
            )
        if int(noise_scale) < 1 or not 0.0 <= float(noise_mix) <= 1.0:
            raise ModelError(f"void: noise_scale must be >= 1 and noise_mix in [0, 1] (got {noise_scale}, {noise_mix})")
        if int(max_area) < 256 or int(feather) < 0:
            raise ModelError(f"void: max_area must be >= 256 and feather >= 0 (got {max_area}, {feather})")
        self.mask, self.prompt, self.negative_prompt = mask, str(prompt), str(negative_prompt)
        self.steps = int(steps)
        self.refine_steps = int(refine_steps) if refine_steps is not None else self.steps
        self.guidance_scale, self.refine_guidance_scale = float(guidance_scale), float(refine_guidance_scale)
        self.window_frames, self.window_overlap, self.window_ramp = int(window_frames), int(window_overlap), window_ramp
        self.max_area, self.seed = int(max_area), int(seed)
        self.noise_scale, self.noise_mix = int(noise_scale), float(noise_mix)
        self.composite, self.feather = bool(composite), int(feather)
        self.memory, self.vae_tiling = memory, bool(vae_tiling)
        self.device, self.dtype = "cpu", "float32"
        self.transformer: Any = None
        self.transformer2: Any = None
        self.vae: Any = None
        self.text_encoder: Any = None
        self.tokenizer: Any = None
        self.scheduler_config: dict[str, Any] = {}
        self.scheduler_cls: Any = None
        self.offload_moves = 0  # component/submodule moves done by the offload modes (tests read it)

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
        import diffusers
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
        cls = getattr(diffusers, str(cfg.get("_class_name", "CogVideoXDDIMScheduler")), None)
        if cls is None or cls.__name__ == "CogVideoXDPMScheduler":
            raise ModelError(
                f"void: {cfg_path}: scheduler {cfg.get('_class_name')!r} is not supported (use a DDIM-style one)"
            )
        self.scheduler_cls, self.scheduler_config = cls, cfg
        if self.vae_tiling:
            self.vae.enable_tiling()
        self.device, self.dtype = device, dtype
        self._place()

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

    def _place(self) -> None:
        """Memory modes: ``full`` puts everything on the device; ``model_offload`` keeps components on the
        CPU and moves each one while it runs (``_use``); ``sequential`` moves each submodule's own weights
        in for its forward and out after (forward hooks), so only one layer is resident at a time."""
        for m in self._components():
            m.to("cpu" if self.memory != "full" else self.device)
        if self.memory == "sequential":
            for m in self._components():
                self._attach_sequential(m)

    def _attach_sequential(self, root: Any) -> None:
        import torch

        dev = torch.device(self.device)

        def move(mod: Any, to: Any) -> None:
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(to)
            for name, b in mod.named_buffers(recurse=False):
                mod._buffers[name] = b.to(to)
            self.offload_moves += 1

        def to_dev(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(dev)
            if isinstance(x, (list, tuple)):
                return type(x)(to_dev(v) for v in x)
            if isinstance(x, dict):
                return {k: to_dev(v) for k, v in x.items()}
            return x

        def pre(mod: Any, args: Any, kwargs: Any) -> Any:
            move(mod, dev)
            return to_dev(args), to_dev(kwargs)

        def post(mod: Any, args: Any, output: Any) -> None:
            move(mod, "cpu")

        for mod in root.modules():
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                mod.register_forward_pre_hook(pre, with_kwargs=True)
                mod.register_forward_hook(post)

    @contextmanager
    def _use(self, module: Any) -> Iterator[Any]:
        """``module`` on the device for the duration (model_offload), else as placed."""
        if self.memory != "model_offload":
            yield module
            return
        module.to(self.device)
        self.offload_moves += 1
        try:
            yield module
        finally:
            module.to("cpu")
            self.offload_moves += 1
            if str(self.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        if self.transformer is None or self.device == "cpu" or self.memory != "full":
            return 0
        seen: set[int] = set()
        total = 0
        for m in self._components():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
        return total

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
        }
        if max(self.guidance_scale, self.refine_guidance_scale) > 1.0:
            cond["negative_embeds"] = self.encode_prompt(str(video.params.get("negative_prompt", self.negative_prompt)))
        return cond

    def encode_prompt(self, text: str) -> np.ndarray:
        """``float32 [seq, dim]`` T5 embedding, padded to the transformer's text length."""
        import torch

        self._need()
        n = int(self.transformer.config.max_text_seq_length)
        ids = self.tokenizer(
            [text], padding="max_length", max_length=n, truncation=True, add_special_tokens=True, return_tensors="pt"
        ).input_ids
        with torch.inference_mode(), self._use(self.text_encoder) as te:
            emb = te(ids.to(self.device if self.memory != "sequential" else "cpu"))[0]
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
        quad = self.read_quadmask(cond, span, frames.shape[1:3])
        lat_shape = self._latent_shape(frames)
        import torch

        gen = torch.Generator().manual_seed(_seed(self.seed, 1, span[0]))
        noise = torch.randn(lat_shape, generator=gen)
        out = self.inpaint(frames, quad, cond, noise, self.transformer, self.guidance_scale, self.steps)
        return {"rgb": out}, None

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
        """Pass 2 over one shard from noise warped along the flow of ``previous["rgb"]`` (pass 1, blended).

        ``state`` in: ``{"noise": float16 [shared_prev, C, h, w]}``, the noise field of the first
        ``shared_prev`` frames as shard i-1 made it (used instead of fresh noise); the returned state holds
        the last ``shared_next`` frames' noise for shard i+1 (None when ``shared_next`` is 0)."""
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
        lat_shape = self._latent_shape(frames)
        _, n_lat, c, hl, wl = lat_shape
        nh, nw = hl * self.noise_scale, wl * self.noise_scale
        init = None
        if state is not None and shared_prev > 0:
            check_state(state, {"noise": (shared_prev, c, nh, nw)}, self.name)
            init = torch.from_numpy(np.asarray(state["noise"], dtype=np.float32))
        quad = self.read_quadmask(cond, span, frames.shape[1:3])
        f_pad = (n_lat - 1) * 4 + 1
        noise_px = self.warped_noise(prev, span[0], init, (nh, nw), c, f_pad)  # [F_pad, C, nh, nw]
        noise = self.pool_noise(noise_px, n_lat)
        out = self.inpaint(frames, quad, cond, noise, self.transformer2, self.refine_guidance_scale, self.refine_steps)
        new_state = {"noise": noise_px[t - shared_next : t].half().numpy()} if shared_next > 0 else None
        return {"rgb": out}, new_state

    def warped_noise(
        self, video: np.ndarray, start: int, init: Any, size: tuple[int, int], channels: int, frames: int
    ) -> Any:
        """``float32 [frames, C, h, w]`` Gaussian noise carried along the flow of ``video`` (``[T, H, W, 3]``
        in [0, 1], mirrored past its end up to ``frames``). Frame ``k`` is fresh noise seeded by the video
        frame index ``start + k`` where nothing flows in; ``init`` fixes the first frames. Values are
        rounded to float16 so that a handed-off copy is the same noise exactly."""
        import torch
        import torch.nn.functional as F

        from actors.flow import estimate_flow, inside, warp

        x = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=size, mode="area") if tuple(x.shape[-2:]) != tuple(size) else x
        x = _pad_time(x, frames).to(self.device)
        k = 0 if init is None else len(init)
        out = torch.empty(frames, channels, *size)
        if k:
            out[:k] = init
        else:
            out[0] = self._fresh_noise(start, channels, size).half().float()
        a = math.sqrt(1.0 - self.noise_mix)
        b = math.sqrt(self.noise_mix)
        first = max(k, 1)
        for c0 in range(first, frames, 32):  # flows in batches of pairs: bounded memory
            c1 = min(frames, c0 + 32)
            with torch.inference_mode():
                flow = estimate_flow(x[c0:c1], x[c0 - 1 : c1 - 1]).cpu()  # frame t(x) ~ frame t-1(x + d)
            valid = inside(flow)
            for j, ti in enumerate(range(c0, c1)):
                fresh = self._fresh_noise(start + ti, channels, size)
                moved = warp(out[ti - 1][None], flow[j : j + 1], mode="nearest")[0]
                n = torch.where(valid[j][None], a * moved + b * fresh, fresh)
                out[ti] = n.half().float()
        return out

    def _fresh_noise(self, frame: int, channels: int, size: tuple[int, int]) -> Any:
        import torch

        return torch.randn(channels, *size, generator=torch.Generator().manual_seed(_seed(self.seed, 2, frame)))

    def pool_noise(self, noise_px: Any, n_lat: int) -> Any:
        """Pixel-grid noise ``[F, C, h*s, w*s]`` -> latent noise ``[1, L, C, h, w]``: mean over s x s cells
        times s (unit variance again), every 4th frame (the VAE's temporal stride, as upstream samples)."""
        import torch.nn.functional as F

        s = self.noise_scale
        pooled = F.avg_pool2d(noise_px, s) * s if s > 1 else noise_px
        idx = np.linspace(0, noise_px.shape[0] - 1, n_lat).round().astype(int)
        return pooled[idx][None]

    # ------------------------------------------------------------------ shared machinery

    def _check_frames(self, frames: np.ndarray, span: tuple[int, int] | None) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ModelError(f"void: frames must be uint8 [T, H, W, 3] RGB (got {frames.dtype} {frames.shape})")
        if span is not None and span[1] - span[0] != len(frames):
            raise ModelError(f"void: span {span} does not match the {len(frames)} frames given")
        return frames

    def _geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(working h, w, VAE spatial stride, temporal patch)."""
        stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        p_t = self.transformer.config.patch_size_t or 1
        h, w = working_size(height, width, self.max_area, stride * self.transformer.config.patch_size)
        return h, w, stride, p_t

    def _latent_window(self) -> tuple[int, int]:
        p_t = self.transformer.config.patch_size_t or 1
        win = max(p_t, ((self.window_frames - 1) // 4 + 1) // p_t * p_t)
        return win, min(self.window_overlap // 4, win - 1)

    def _latent_shape(self, frames: np.ndarray) -> tuple[int, int, int, int, int]:
        h, w, stride, p_t = self._geometry(*frames.shape[1:3])
        win, _ = self._latent_window()
        f = padded_frames(len(frames), win, p_t)
        return (1, (f - 1) // 4 + 1, self.vae.config.latent_channels, h // stride, w // stride)

    def read_quadmask(self, cond: Any, span: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """``uint8 [T, H, W]`` quadmask levels for video frames ``span``, at the frames' size."""
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
        gray = m.astype(np.float32).mean(axis=-1)  # [T, h, w]
        if gray.shape[1:] != tuple(size):
            g = F.interpolate(torch.from_numpy(gray)[:, None], size=tuple(size), mode="area")
            gray = g[:, 0].numpy()
        return quantize_quadmask(gray)

    def inpaint(
        self, frames: np.ndarray, quad: np.ndarray, cond: Any, noise: Any, transformer: Any, guidance: float, steps: int
    ) -> np.ndarray:
        """The windowed denoising from ``noise`` (``[1, L, C, h, w]``) for one clip, decoded, resized back
        to the source size and composited: ``float32 [T, H, W, 3]`` in [0, 1]."""
        import torch
        import torch.nn.functional as F

        t, height, width = frames.shape[:3]
        h, w, _, p_t = self._geometry(height, width)
        n_lat = noise.shape[1]
        f_pad = (n_lat - 1) * 4 + 1
        dev = torch.device(self.device)
        tdt = getattr(torch, self.dtype)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
            q = torch.from_numpy(quad.astype(np.float32))[:, None]  # [T, 1, H, W] levels 0..255
            if (h, w) != (height, width):
                x = F.interpolate(x, size=(h, w), mode="area")
                q = torch.from_numpy(
                    quantize_quadmask(F.interpolate(q, size=(h, w), mode="area").numpy()).astype(np.float32)
                )
            video = _pad_time(x, f_pad) * 2.0 - 1.0
            maskin = (1.0 - _pad_time(q, f_pad) / 255.0).expand(-1, 3, -1, -1)  # 1 = remove, 0 = keep
            vid_lat = self._encode(video)
            mask_lat = self._encode(maskin)
            inpaint = torch.cat([mask_lat, vid_lat], dim=2)  # [1, L, 2C, h/8, w/8]
            if inpaint.shape[1] != n_lat:
                raise ModelError(f"void: the VAE made {inpaint.shape[1]} latent frames, the noise has {n_lat}")
            latents = self._denoise(noise.to(dev, torch.float32), inpaint, cond, transformer, guidance, steps, h, w)
            with self._use(self.vae) as vae:
                sf = vae.config.scaling_factor
                z = (latents / sf).permute(0, 2, 1, 3, 4).to(self._vae_device(), tdt)
                dec = vae.decode(z).sample.float()  # [1, 3, F, h, w] in [-1, 1]
            dec = (dec[0].permute(1, 0, 2, 3)[:t] * 0.5 + 0.5).clamp(0, 1).cpu()  # [T, 3, h, w]
            if (h, w) != (height, width):
                dec = F.interpolate(dec, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
            out = dec.permute(0, 2, 3, 1).contiguous()  # [T, H, W, 3]
            if self.composite:
                src = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
                alpha = self.composite_alpha(quad)[..., None]
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
        return "cpu" if self.memory == "sequential" else self.device

    def _encode(self, pixels: Any) -> Any:
        """``[F, 3, h, w]`` -> scaled latents ``[1, L, C, h/8, w/8]`` (the distribution's mode)."""
        import torch

        with self._use(self.vae) as vae:
            z = pixels.permute(1, 0, 2, 3)[None].to(self._vae_device(), getattr(torch, self.dtype))
            lat = vae.encode(z).latent_dist.mode() * vae.config.scaling_factor
        return lat.float().to(self.device).permute(0, 2, 1, 3, 4)

    def _scheduler(self) -> Any:
        """A fresh scheduler per call: no state survives between shards."""
        return self.scheduler_cls.from_config(self.scheduler_config)

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

    def _denoise(
        self, noise: Any, inpaint: Any, cond: Any, transformer: Any, guidance: float, steps: int, h: int, w: int
    ) -> Any:
        """Windowed denoising: every step, each window's prediction is blended into one over the clip."""
        import torch

        dev = torch.device(self.device)
        tdt = getattr(torch, self.dtype)
        n_lat = noise.shape[1]
        win, overlap = self._latent_window()
        windows = latent_windows(n_lat, win, overlap)
        weights = [
            torch.from_numpy(wt).float().to(dev).view(1, -1, 1, 1, 1)
            for wt in window_weights(windows, self.window_ramp)
        ]
        total = torch.zeros(1, n_lat, 1, 1, 1, device=dev)
        for (s, e), wt in zip(windows, weights, strict=True):
            total[:, s:e] += wt
        pos = torch.from_numpy(np.asarray(cond["prompt_embeds"], dtype=np.float32))[None].to(dev, tdt)
        cfg = guidance > 1.0
        if cfg:
            if "negative_embeds" not in cond:
                raise ModelError("void: guidance > 1 needs negative_embeds in cond (prepare() ran with guidance 1)")
            neg = torch.from_numpy(np.asarray(cond["negative_embeds"], dtype=np.float32))[None].to(dev, tdt)
            emb = torch.cat([neg, pos])
        else:
            emb = pos
        sched = self._scheduler()
        sched.set_timesteps(steps, device=dev)
        latents = noise * sched.init_noise_sigma
        ropes: dict[int, Any] = {}
        ofs = None
        if getattr(transformer.config, "ofs_embed_dim", None):
            ofs = torch.full((emb.shape[0],), 2.0, device=dev)
        with self._use(transformer) as tr:
            for t in sched.timesteps:
                pred = torch.zeros_like(latents)
                for (s, e), wt in zip(windows, weights, strict=True):
                    if e - s not in ropes:
                        ropes[e - s] = self._rope(tr, h, w, e - s)
                    x = torch.cat([sched.scale_model_input(latents[:, s:e], t), inpaint[:, s:e]], dim=2).to(tdt)
                    if cfg:
                        x = torch.cat([x, x])
                    out = (
                        tr(
                            hidden_states=x,
                            encoder_hidden_states=emb,
                            timestep=t.expand(x.shape[0]).to(dev),
                            image_rotary_emb=ropes[e - s],
                            ofs=ofs,
                            return_dict=False,
                        )[0]
                        .float()
                        .to(dev)
                    )
                    if cfg:
                        uncond, text = out.chunk(2)
                        out = uncond + guidance * (text - uncond)
                    pred[:, s:e] += out * wt
                latents = sched.step(pred / total, t, latents, return_dict=False)[0]
        return latents


def _pad_time(x: Any, frames: int) -> Any:
    """``[T, ...]`` -> ``[frames, ...]`` by mirroring the end (upstream's temporal padding)."""
    import torch

    while x.shape[0] < frames:
        x = torch.cat([x, torch.flip(x, dims=[0])[1:] if x.shape[0] > 1 else x])
    return x[:frames]


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
