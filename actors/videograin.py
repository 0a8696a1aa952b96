"""VideoGrain: class-, instance- and part-level video editing (Yang et al., ICLR 2025; knightyxp/VideoGrain).

A global prompt, one local prompt per region and one mask per region drive a zero-shot edit of
Stable Diffusion 1.5 + ControlNet, computed as upstream's code computes it (pinned by
``tests/test_videograin_reference.py`` on ``../shared/reference/videograin/``):

1. the UNet and ControlNet are upstream's inflated nets (``actors/videograin_nets.py``): the standard
   checkpoints in diffusers' classes, resnet GroupNorms folding the clip's frames into their statistics;
2. DDIM inversion from a VAE *sample*, noise predicted at each step's starting timestep, with the source
   prompt, FLATTEN on;
3. DDIM editing with ST-Layout attention (``actors/videograin_attention.py``) over the first
   ``modulated_steps`` steps, FLATTEN along optical-flow trajectories (``actors/videograin_flatten.py``),
   optional PnP injection of the inversion's features and FreeU; the ControlNet attends per frame, is
   never modulated and reads the plain prompt (and the negative prompt); the UNet's unconditional text
   is always the empty prompt; latents outside the union of the masks are blended back to the noised source.

Long videos (farm's addition; a video that fits one clip is edited exactly as upstream): farm renders
overlapping clips in parallel (``state: none``) and blends their overlaps. To keep clips consistent,
``prepare`` edits a few anchor frames of the video once (their own inversion and edit) and keeps their
latent at every editing step; every clip runs the anchors beside its frames, so its full-frame
self-attention also attends to the anchors' keys/values, which are the same in every clip.

Inversions are cached under ``cache`` (any fsspec prefix), keyed by the clip's pixels, its control
images, the weights and the inversion settings: a new prompt on the same video inverts nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoContext, VideoModel, WindowSpec

_DTYPES = ("float32", "float16", "bfloat16")
_CONTROLS = ("sobel", "luma", "none")
_CACHE_VERSION = b"videograin-inversion-2"
_FLOW_METHODS = ("dis", "raft")
_LEVELS = (1, 2, 4, 8)  # flatten_res factors: the UNet's levels below the latent size
# Params a manifest row (or the job) may set per video; the rest configure the actor.
PER_VIDEO = ("prompt", "local_prompts", "masks", "source_prompt", "negative_prompt", "control_video")
DEFAULTS: dict[str, Any] = {
    "prompt": None,  # the global prompt of the edited video
    "local_prompts": None,  # one per region; each a phrase of the global prompt
    "masks": None,  # one per region: a mask video, a folder of PNGs or one image (white = region)
    "source_prompt": "",  # describes the source video; used by the inversion
    "negative_prompt": "",  # reaches the ControlNet only (upstream); the UNet's unconditional text is ""
    "control": "sobel",  # computed ControlNet input when no control_video: sobel | luma | none
    "control_video": None,  # supplied ControlNet input (depth / pose video), the source's frame count
    "control_scale": 1.0,  # upstream's controlnet_conditioning_scale
    "controlnet": None,  # ControlNet weights when the weights folder has no controlnet/ (local or hf://)
    "strength": 1.0,  # share of the DDIM schedule inverted and re-generated (upstream: all of it)
    "steps": 50,  # upstream's num_inference_steps
    "guidance": 7.5,  # upstream's guidance_scale
    "modulated_steps": 15,  # editing steps with ST-Layout modulation (upstream's fixed end_step)
    "sreg": 0.3,
    "creg": 1.0,
    "modulate_full_res": False,  # upstream never modulates the latent-size level (xformers there)
    "flatten_res": [1],  # FLATTEN at latent size / f for each f (upstream's flatten_res); [] = off
    "flow_method": "dis",  # optical flow for FLATTEN: OpenCV DIS, or RAFT-large with flow_weights
    "flow_weights": None,  # RAFT-large weights (a local path or URL); upstream runs RAFT
    "old_qk": 1,  # FLATTEN's queries/keys: 1 = the layer's to_q/to_k (upstream's configs), 0 = its output
    "use_pnp": False,  # PnP: inject the inversion's decoder features and self-attention q/k
    "inject_step": 0,  # ... over the first inject_step editing steps
    "use_freeu": False,  # FreeU with b1 b2 s1 s2 (upstream's values when on)
    "b1": 1.2,
    "b2": 1.5,
    "s1": 1.0,
    "s2": 1.0,
    "resolution": 512,  # the short side the model works at (each side a multiple of the UNet's stride)
    "seed": 0,  # VAE posterior draw and background-blend noise (per clip: seed + first frame)
    "anchors": 2,  # anchor frames shared by every clip of a video longer than one clip; 0 turns anchors off
    "anchor_span": None,  # anchors spread over the first N frames (None: the whole video)
    "cache": None,  # URL prefix where inverted latents are kept per clip
    "trace": None,  # URL prefix: one JSON per clip (anchor fingerprint, inverted or cached) for audits
    "keep_background": False,  # outside all masks keep the source's own pixels, at full resolution
    "feather": 4,  # px (source size) over which the edit fades into the kept background
    "vae_batch": 4,  # frames per VAE call
    "attn_chunk": 1 << 26,  # score elements per explicit (modulated / FLATTEN) attention chunk
}
# Upstream's config names for params farm names otherwise: either spelling is accepted, not both.
UPSTREAM_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance",
                  "controlnet_conditioning_scale": "control_scale"}
_WORDS = re.compile(r"[\w'-]+")


def _words(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def _as_list(value: Any, field: str) -> list[str]:
    """A list of strings; a manifest cell may hold them separated by ``;``."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(";") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ModelError(f"videograin: {field}: must be a list of strings (got {value!r})")
    return [v.strip() for v in value]


def _farm_names(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with upstream's config names turned into farm's; one line when both spell one param."""
    out = dict(params)
    for up, ours in UPSTREAM_NAMES.items():
        if up in out:
            if ours in out:
                raise ModelError(f"videograin: {up}: the same param as {ours}; give one of them")
            out[ours] = out.pop(up)
    return out


def _check_phrases(prompt: str, local_prompts: list[str]) -> None:
    """Each local prompt's words occur in the global prompt, in order and adjacent (upstream finds its
    tokens there)."""
    words = _words(prompt)
    for i, lp in enumerate(local_prompts):
        lw = _words(lp)
        if not lw:
            raise ModelError(f"videograin: local_prompts[{i}]: empty")
        for w in lw:
            if w not in words:
                raise ModelError(f"videograin: local_prompts[{i}]: word {w!r} does not occur in prompt {prompt!r}")
        if not any(words[j : j + len(lw)] == lw for j in range(len(words) - len(lw) + 1)):
            raise ModelError(
                f"videograin: local_prompts[{i}]: {lp!r} must appear as one phrase in prompt {prompt!r} "
                f"(its words are there, not in this order)"
            )


class VideoGrain(VideoModel):
    """Params: see ``DEFAULTS``. ``prompt``, ``local_prompts``, ``masks`` (and the other ``PER_VIDEO``
    keys) may come per video from a manifest row."""

    name: ClassVar[str] = "videograin"
    window: ClassVar[WindowSpec] = WindowSpec(frames=16, overlap=4, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("rgb",)
    needs_weights: ClassVar[bool] = True
    chunk_frames: ClassVar[int | None] = None
    takes_span: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.validate_params(params)
        merged = {**DEFAULTS, **_farm_names(params)}
        super().__init__(**merged)
        self.p = merged
        self.unet: Any = None
        self.controlnet: Any = None
        self.device, self.dtype = "cpu", "float32"

    # ------------------------------------------------------------------ params

    @classmethod
    def validate_params(cls, params: dict[str, Any], complete: bool = False) -> None:
        """One-line ModelError naming the field; ``complete``: the per-video inputs must all be there."""
        unknown = sorted(set(params) - set(DEFAULTS) - set(UPSTREAM_NAMES))
        if unknown:
            raise ModelError(f"videograin: {unknown[0]}: unknown param (known: {', '.join(DEFAULTS)}; "
                             f"also upstream's {', '.join(UPSTREAM_NAMES)})")
        p = {**DEFAULTS, **_farm_names(params)}

        def number(key: str, lo: float, hi: float | None = None, integer: bool = False, lo_open: bool = False):
            v = p[key]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
            if ok:
                ok = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
                raise ModelError(f"videograin: {key}: must be {'an integer' if integer else 'a number'} in {rng} "
                                 f"(got {v!r})")

        number("strength", 0, 1, lo_open=True)
        number("steps", 1, 1000, integer=True)
        number("guidance", 0)
        number("modulated_steps", 0, 1000, integer=True)
        number("inject_step", 0, 1000, integer=True)
        for key in ("b1", "b2", "s1", "s2"):
            number(key, 0)
        for key in ("use_pnp", "use_freeu", "keep_background", "modulate_full_res"):
            if not isinstance(p[key], bool):
                raise ModelError(f"videograin: {key}: must be true or false (got {p[key]!r})")
        if p["old_qk"] not in (0, 1) or isinstance(p["old_qk"], bool):
            raise ModelError(f"videograin: old_qk: must be 0 or 1 (got {p['old_qk']!r})")
        fr = p["flatten_res"]
        if not isinstance(fr, (list, tuple)) or any(isinstance(f, bool) or f not in _LEVELS for f in fr):
            raise ModelError(f"videograin: flatten_res: must be a list of factors from {list(_LEVELS)} "
                             f"(got {fr!r})")
        if p["flow_method"] not in _FLOW_METHODS:
            raise ModelError(f"videograin: flow_method: must be one of {', '.join(_FLOW_METHODS)} "
                             f"(got {p['flow_method']!r})")
        if p["use_pnp"] and p["inject_step"] >= p["steps"]:
            raise ModelError(f"videograin: inject_step: must be below steps ({p['steps']}) "
                             f"(got {p['inject_step']!r})")
        number("sreg", 0)
        number("creg", 0)
        number("control_scale", 0)
        number("resolution", 8, 4096, integer=True)
        number("seed", 0, integer=True)
        number("anchors", 0, 64, integer=True)
        number("vae_batch", 1, integer=True)
        number("attn_chunk", 1, integer=True)
        number("feather", 0, 256, integer=True)
        if p["anchor_span"] is not None:
            number("anchor_span", 1, integer=True)
        if p["control"] not in _CONTROLS:
            raise ModelError(f"videograin: control: must be one of {', '.join(_CONTROLS)} (got {p['control']!r})")
        for key in ("source_prompt", "negative_prompt"):
            if not isinstance(p[key], str):
                raise ModelError(f"videograin: {key}: must be a string (got {p[key]!r})")
        for key in ("control_video", "controlnet", "cache", "trace", "flow_weights"):
            if p[key] is not None and not (isinstance(p[key], str) and p[key].strip()):
                raise ModelError(f"videograin: {key}: must be a URL or path (got {p[key]!r})")
        prompt = p["prompt"]
        if prompt is not None and not (isinstance(prompt, str) and _words(prompt)):
            raise ModelError(f"videograin: prompt: must be a non-empty string (got {prompt!r})")
        local = _as_list(p["local_prompts"], "local_prompts") if p["local_prompts"] is not None else None
        masks = _as_list(p["masks"], "masks") if p["masks"] is not None else None
        if complete:
            for key, v in (("prompt", prompt), ("local_prompts", local), ("masks", masks)):
                if not v:
                    raise ModelError(f"videograin: {key}: required (the job's model.params or a manifest column)")
        if local is not None and masks is not None and len(local) != len(masks):
            raise ModelError(
                f"videograin: masks: {len(masks)} masks for {len(local)} local_prompts (one mask per local prompt)"
            )
        if prompt is not None and local:
            _check_phrases(prompt, local)

    # ------------------------------------------------------------------ weights

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """A diffusers-format folder: ``unet/ vae/ text_encoder/ tokenizer/`` [``scheduler/ controlnet/``]."""
        if not weights:
            raise ModelError("videograin: needs weights (a Stable Diffusion 1.5 folder in diffusers format)")
        if dtype not in _DTYPES:
            raise ModelError(f"videograin: dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        root = Path(weights)
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not (root / s).is_dir()]
        if missing:
            raise ModelError(f"videograin: weights {weights!r} lack {', '.join(s + '/' for s in missing)}")
        import torch
        from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from actors.videograin_attention import STContext, STLayoutAttnProcessor
        from actors.videograin_nets import PNP_ATTENTIONS, add_freeu_hooks, add_pnp_hooks, inflate

        td = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=td)
        self.vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=td, low_cpu_mem_usage=False)
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=td, low_cpu_mem_usage=False)
        cn = root / "controlnet" if (root / "controlnet").is_dir() else None
        if self.p["controlnet"]:
            from farm.weights import resolve

            cn = resolve(self.p["controlnet"])
        self.controlnet = ControlNetModel.from_pretrained(cn, torch_dtype=td, low_cpu_mem_usage=False) if cn else None
        if self.controlnet is None and (self.p["control"] != "none" or self.p["control_video"]):
            raise ModelError(
                f"videograin: control={self.p['control']!r} needs a ControlNet (weights folder controlnet/ or "
                "param controlnet); set control: none to edit without one"
            )
        if (root / "scheduler").is_dir():
            self.scheduler = DDIMScheduler.from_pretrained(root / "scheduler")
        else:  # Stable Diffusion 1.5's schedule
            self.scheduler = DDIMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1,
            )
        self.ctx = STContext(sreg=float(self.p["sreg"]), creg=float(self.p["creg"]), old_qk=int(self.p["old_qk"]),
                             modulate_full_res=bool(self.p["modulate_full_res"]), chunk=int(self.p["attn_chunk"]))
        nets = [self.text_encoder, self.vae, self.unet] + ([self.controlnet] if self.controlnet is not None else [])
        for net in nets:
            net.to(device).eval().requires_grad_(False)
        # Upstream's inflated nets: the same weights, GroupNorms over the clip (the ControlNet keeps
        # diffusers' per-frame attention); the UNet's attention is ST-Layout + FLATTEN + PnP.
        for net in nets[2:]:
            inflate(net, self.ctx)
        self.unet.set_attn_processor({
            name: STLayoutAttnProcessor(self.ctx, name[: -len(".processor")],
                                        pnp=name[: -len(".processor")] in PNP_ATTENTIONS)
            for name in self.unet.attn_processors})
        add_pnp_hooks(self.unet, self.ctx)
        if self.p["use_freeu"]:
            add_freeu_hooks(self.unet, *(float(self.p[k]) for k in ("b1", "b2", "s1", "s2")))
        self.device, self.dtype, self.td = device, dtype, td
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.stride = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        # Content fingerprint of the weights (not of a node-local path): part of the inversion cache key.
        h = hashlib.sha256()
        for net in nets:
            conf = net.config.to_dict() if hasattr(net.config, "to_dict") else dict(net.config)
            h.update(json.dumps(conf, sort_keys=True, default=str).encode())
            first = next(net.parameters()).detach().flatten()[: 1 << 20]  # enough to tell checkpoints apart
            h.update(first.float().cpu().numpy().tobytes())
        self.weights_id = h.hexdigest()[:16]

    def memory_bytes(self) -> int:
        if self.unet is None or self.device == "cpu":
            return 0
        nets = [self.text_encoder, self.vae, self.unet] + ([self.controlnet] if self.controlnet is not None else [])
        return sum(p.numel() * p.element_size() for n in nets for p in n.parameters())

    def _need(self) -> None:
        if self.unet is None:
            raise ModelError("videograin: load() the weights before prepare/render")

    # ------------------------------------------------------------------ pieces

    def model_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the model works at: short side ``resolution``, each side a multiple of its stride."""
        s, m = int(self.p["resolution"]) / min(height, width), self.stride
        return max(m, round(height * s / m) * m), max(m, round(width * s / m) * m)

    def _resize_u8(self, frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``uint8 [T, H, W, 3]`` -> ``uint8 [T, h, w, 3]`` (antialiased bilinear)."""
        import torch
        import torch.nn.functional as F

        if frames.shape[1:3] == tuple(size):
            return np.ascontiguousarray(frames)
        x = torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def _control(self, frames_m: np.ndarray, video_frames: Any) -> np.ndarray | None:
        """``uint8 [T, h, w, 3]`` ControlNet input at model size, or None without a ControlNet.
        ``video_frames``: frames of the supplied control video, when there is one."""
        if self.controlnet is None or float(self.p["control_scale"]) == 0:
            return None
        if video_frames is not None:
            return self._resize_u8(video_frames, frames_m.shape[1:3])
        y = frames_m.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [T, h, w]
        if self.p["control"] == "luma":
            out = y
        elif self.p["control"] == "sobel":  # an edge map: needs no weights; not what a depth ControlNet saw
            p = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="edge")
            right = p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]
            left = p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2]
            down = p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]
            up = p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:]
            gx, gy = right - left, down - up
            mag = np.hypot(gx, gy)
            out = 255 * mag / np.maximum(mag.max(axis=(1, 2), keepdims=True), 1e-6)
        else:
            return None
        return np.repeat(np.clip(out, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)

    def _tensor(self, u8: np.ndarray, lo: float = 0.0) -> Any:
        """``uint8 [T, h, w, 3]`` -> ``[T, 3, h, w]`` in ``[lo, 1]`` on the device."""
        import torch

        x = torch.from_numpy(np.array(u8, dtype=np.float32)).permute(0, 3, 1, 2) / 255
        return (x * (1 - lo) + lo).to(self.device, self.td)

    def _encode_text(self, text: str) -> Any:
        import torch

        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            return self.text_encoder(ids.to(self.device))[0][0]  # [L, D]

    def encode_prompts(self, prompt: str, local_prompts: list[str], source_prompt: str, negative_prompt: str
                       ) -> dict[str, np.ndarray]:
        """The texts each net reads, as upstream: the editing UNet ``[empty; cond]``, ``cond`` = the prompt in
        which the first occurrence of each local prompt's tokens is replaced by that local prompt encoded alone
        (its rows ``1 .. len``), ``token_regions [R, L]`` those positions; the editing ControlNet
        ``[negative; prompt]``; both nets in the inversion ``[empty; source]``."""
        self._need()
        max_len = self.tokenizer.model_max_length
        gids = self.tokenizer(prompt, padding="max_length", max_length=max_len, truncation=True).input_ids
        plain = self._encode_text(prompt)
        cond = plain.clone()
        regions = np.zeros((len(local_prompts), len(gids)), dtype=np.float32)
        for i, lp in enumerate(local_prompts):
            words = self.tokenizer(lp, add_special_tokens=False).input_ids
            hit = next((j for j in range(len(gids) - len(words) + 1) if gids[j : j + len(words)] == words), None)
            if hit is None:
                raise ModelError(
                    f"videograin: local_prompts[{i}]: the tokens of {lp!r} are not found in prompt {prompt!r} "
                    f"(beyond the {max_len}-token limit, or split differently by the tokenizer)"
                )
            cond[hit : hit + len(words)] = self._encode_text(lp)[1 : 1 + len(words)]
            regions[:, hit : hit + len(words)] = 0  # a later local prompt takes a shared token (upstream)
            regions[i, hit : hit + len(words)] = 1
        enc = {"cond": cond, "prompt": plain, "negative": self._encode_text(negative_prompt),
               "empty": self._encode_text(""), "source": self._encode_text(source_prompt)}
        return {k: v.float().cpu().numpy() for k, v in enc.items()} | {"token_regions": regions}

    def _texts(self, text: dict[str, np.ndarray], names: list[str], frames: int) -> Any:
        """``[len(names) * frames, L, D]``: each named text for every frame of its half."""
        import torch

        # copies: arrays from the object store are read-only
        embs = [torch.from_numpy(np.array(text[n])).to(self.device, self.td) for n in names]
        return torch.cat([e[None].expand(frames, -1, -1) for e in embs])

    def _timesteps(self) -> list[int]:
        steps = int(self.p["steps"])
        self.scheduler.set_timesteps(steps)
        keep = min(int(steps * float(self.p["strength"])), steps)
        ts = [int(t) for t in self.scheduler.timesteps[steps - keep:]]
        if not ts:
            raise ModelError(f"videograin: strength {self.p['strength']} leaves no step of {steps}; raise either")
        return ts

    def _coef(self, t: int) -> tuple[Any, Any]:
        """``(sqrt(a_t), sqrt(1 - a_t))``, ``a`` = alphas_cumprod (the final one below 0), in float32 like the
        schedulers' own arithmetic."""
        import torch

        a = self.scheduler.alphas_cumprod[t] if t >= 0 else self.scheduler.final_alpha_cumprod
        a = torch.as_tensor(a, dtype=torch.float32)
        return (a**0.5).to(self.device), ((1 - a) ** 0.5).to(self.device)

    def _eps(self, x: Any, t: int, unet_text: Any, cn_text: Any, control: Any) -> Any:
        """UNet noise prediction for the batch ``x [B, 4, h, w]`` (ControlNet residuals when it has one)."""
        import torch

        tt = torch.tensor(t, device=self.device)
        down = mid = None
        if control is not None:
            down, mid = self.controlnet(x, tt, encoder_hidden_states=cn_text, controlnet_cond=control,
                                        conditioning_scale=float(self.p["control_scale"]), return_dict=False)
        return self.unet(x, tt, encoder_hidden_states=unet_text, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample

    def _vae_encode(self, frames_m: np.ndarray, seed: int) -> tuple[Any, Any]:
        """``(mean, sample)`` latents ``[T, 4, h, w]`` times the scaling factor: upstream inverts from a
        posterior sample (its draw: ``randn`` of the clip's latent shape from ``seed``) and blends to the mean."""
        import torch

        b = int(self.p["vae_batch"])
        means, stds = [], []
        for i in range(0, len(frames_m), b):
            dist = self.vae.encode(self._tensor(frames_m[i : i + b], lo=-1.0)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        mean, std = torch.cat(means), torch.cat(stds)
        eps = torch.randn(tuple(mean.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        sf = self.vae.config.scaling_factor
        return mean * sf, (mean + std * eps.to(self.device, mean.dtype)) * sf

    def _vae_decode(self, lat: Any) -> np.ndarray:
        b = int(self.p["vae_batch"])
        out = []
        for i in range(0, len(lat), b):
            x = self.vae.decode(lat[i : i + b] / self.vae.config.scaling_factor).sample
            out.append((x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def _layouts(self, masks: np.ndarray) -> Any:
        """``bool [R, F, H, W]`` masks at model size -> ``[R, F, H / 8, W / 8]``: pixel ``(8i, 8j)`` (upstream's
        nearest resize). One region per mask; a cell in no mask is in no region."""
        import torch

        f = self.vae_factor
        return torch.from_numpy(np.ascontiguousarray(masks[:, :, ::f, ::f])).to(self.device, self.td)

    def flow(self, frames_m: np.ndarray, p: dict[str, Any]) -> np.ndarray:
        """Optical flow frame t -> t+1, ``float32 [T-1, 2, H, W]`` at model size (pixels, x then y, with
        ``a(x) = b(x + d)``), from ``actors.flow.estimate_flow``: DIS, or RAFT-large given ``flow_weights``."""
        import torch

        from actors.flow import estimate_flow

        x = torch.from_numpy(np.array(frames_m, dtype=np.float32)).permute(0, 3, 1, 2) / 255
        fl = estimate_flow(x[:-1], x[1:], method=p["flow_method"], weights=p["flow_weights"])
        return np.asarray(fl.float().cpu().numpy() if hasattr(fl, "cpu") else fl, dtype=np.float32)

    def _flatten(self, frames_m: np.ndarray, p: dict[str, Any], lat_hw: tuple[int, int]) -> Any:
        """FLATTEN's trajectories ``{n: (index, mask)}`` for the clip, or None (off, or one frame)."""
        from actors.videograin_flatten import trajectories

        if not p["flatten_res"] or len(frames_m) < 2:
            return None
        import torch

        flow = torch.from_numpy(self.flow(frames_m, p))
        levels = [(lat_hw[0] // f, lat_hw[1] // f) for f in sorted(set(p["flatten_res"]))]
        traj = trajectories(flow, levels, lat_hw)
        return {n: (i.to(self.device), m.to(self.device)) for n, (i, m) in traj.items()}

    # ------------------------------------------------------------------ inversion and editing

    def _invert(self, x0: Any, control: Any, text: dict[str, np.ndarray], ts: list[int], flatten: Any,
                keep: set[int]) -> tuple[Any, dict[int, Any]]:
        """DDIM inversion of the VAE sample ``x0 [T, 4, h, w]`` with the source prompt, as upstream: the clean
        latent taken as level ``ts[-1]``, noise predicted at each step's starting timestep, FLATTEN on, no
        modulation. Upstream's guidance 1 over ``[empty; source]`` is the source half alone (``eu + 1 (ec - eu)``);
        so one half runs. Returns ``xT`` and the latent entering the calls at timesteps ``keep`` (for PnP)."""
        t_n = len(x0)
        src = self._texts(text, ["source"], t_n)
        self.ctx.reset(frames=t_n, anchors=0, halves=1, layouts=None, token_regions=None, modulate=False,
                       flatten=flatten, pnp=None, pnp_store={}, fingerprint_rows=None, latent_hw=tuple(x0.shape[-2:]))
        up = list(reversed(ts))
        x, saved = x0, {}
        for t, t_next in zip(up[:-1], up[1:], strict=True):
            if t in keep:
                saved[t] = x
            eps = self._eps(x, t, src, src, control)
            (a_t, b_t), (a_n, b_n) = self._coef(t), self._coef(t_next)
            x = a_n * ((x - b_t * eps) / a_t) + b_n * eps
        return x, saved

    def _edit(self, xt: Any, x0: Any, control: Any, layouts: Any, text: dict[str, np.ndarray], ts: list[int],
              seed: int, anchors: dict[str, Any] | None, fingerprint_rows: str | None, flatten: Any = None,
              saved: dict[int, Any] | None = None) -> tuple[Any, list[Any]]:
        """DDIM editing from ``xt`` with ST-Layout attention, FLATTEN and PnP; latents outside the masks blended
        to the noised source mean ``x0``. Returns the edited latents and the latent entering every step."""
        import torch

        t_n = len(xt)
        guided = float(self.p["guidance"]) > 1
        halves = 2 if guided else 1
        a_n = 0 if anchors is None else int(anchors["traj"].shape[1])
        f = t_n + a_n
        lay = layouts if a_n == 0 else torch.cat([layouts, anchors["layouts"]], dim=1)
        ctl = control if control is None or a_n == 0 else torch.cat([control, anchors["control"]])
        ctl = None if ctl is None else torch.cat([ctl] * halves)
        unet_text = self._texts(text, ["empty", "cond"] if guided else ["cond"], f)
        cn_text = self._texts(text, ["negative", "prompt"] if guided else ["prompt"], f)
        regions = torch.from_numpy(np.array(text["token_regions"])).to(self.device)
        n_pnp = int(self.p["inject_step"]) if self.p["use_pnp"] and saved is not None else 0
        if n_pnp:
            inv_text = self._texts(text, ["empty", "source"], t_n)
            inv_ctl = None if control is None else torch.cat([control] * 2)
        keep = (layouts.amax(0)[:, None] > 0).to(xt.dtype)  # [T, 1, h, w]: union of the regions
        blend = not bool(keep.all())
        g = torch.Generator().manual_seed(int(seed))
        ratio = self.scheduler.config.num_train_timesteps // int(self.p["steps"])
        self.ctx.fingerprint = None
        x, traj = xt, []
        for i, t in enumerate(ts):
            traj.append(x)
            inject = i < n_pnp and i + 1 < len(ts)
            if inject:  # upstream's recording of the inversion call 20 timesteps lower, made again here
                self.ctx.reset(frames=t_n, anchors=0, halves=2, layouts=None, token_regions=None, modulate=False,
                               flatten=flatten, pnp="record", pnp_store={}, fingerprint_rows=None)
                self._eps(torch.cat([saved[ts[i + 1]]] * 2), ts[i + 1], inv_text, inv_text, inv_ctl)
            self.ctx.reset(frames=t_n, anchors=a_n, halves=halves, layouts=lay, token_regions=regions,
                           modulate=i < int(self.p["modulated_steps"]), treg=torch.pow((torch.tensor(t) - 1) / 1000, 5),
                           flatten=flatten, pnp="inject" if inject else None, fingerprint_rows=fingerprint_rows)
            if not inject:
                self.ctx.pnp_store = {}
            xin = x if a_n == 0 else torch.cat([x, anchors["traj_t"][i]])
            eps = self._eps(torch.cat([xin] * halves), t, unet_text, cn_text, ctl)
            if guided:
                eu, ec = eps.chunk(2)
                eps = eu + float(self.p["guidance"]) * (ec - eu)
            eps = eps[:t_n]
            (a_t, b_t), (a_p, b_p) = self._coef(t), self._coef(t - ratio)
            x = a_p * ((x - b_t * eps) / a_t) + b_p * eps
            if blend:  # upstream: the source mean noised to the step's own t, fresh noise every step
                noise = torch.randn(tuple(x.shape), generator=g, dtype=torch.float32).to(self.device, x.dtype)
                x = x * keep + (a_t * x0 + b_t * noise) * (1 - keep)
        self.ctx.pnp_store = {}
        return x, traj

    def _inverted(self, frames_m: np.ndarray, control_u8: np.ndarray | None, control: Any,
                  text: dict[str, np.ndarray], ts: list[int], p: dict[str, Any], so: dict[str, Any], seed: int,
                  flatten: Any) -> tuple[Any, Any, dict[int, Any], dict[str, Any]]:
        """``(x0 mean, xT, PnP latents, info)`` of a clip, from the cache when it holds them."""
        import torch

        from farm import storage

        n_pnp = min(int(p["inject_step"]), len(ts) - 1) if p["use_pnp"] else 0
        keep = set(ts[1 : 1 + n_pnp])  # editing step i < inject_step re-runs the inversion call at ts[i + 1]
        fl = None if flatten is None else [sorted(set(p["flatten_res"])), p["flow_method"], p["flow_weights"]]
        h = hashlib.sha256(_CACHE_VERSION)
        h.update(json.dumps({"w": self.weights_id, "dtype": self.dtype, "ts": ts, "steps": int(self.p["steps"]),
                             "cs": float(self.p["control_scale"]), "seed": seed, "flatten": fl, "pnp": sorted(keep),
                             "freeu": [float(p[k]) for k in ("b1", "b2", "s1", "s2")] if p["use_freeu"] else None,
                             "shape": list(frames_m.shape)}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(text["source"]).tobytes())  # the (per-video) source prompt, encoded
        h.update(np.ascontiguousarray(frames_m).tobytes())
        if control_u8 is not None:
            h.update(np.ascontiguousarray(control_u8).tobytes())
        key = h.hexdigest()[:32]
        url = storage.join(p["cache"], f"{key}.npz") if p["cache"] else None
        if url and storage.exists(url, so):
            with np.load(io.BytesIO(storage.read_bytes(url, so)), allow_pickle=False) as z:
                x0, xt = z["x0"], z["xT"]
                saved = {int(t): torch.from_numpy(z[f"pnp_{t}"]).to(self.device, self.td) for t in z["pnp_ts"]}
            info = {"cache_key": key, "inverted": False, "xT_sha": hashlib.sha256(xt.tobytes()).hexdigest()[:16]}
            return (torch.from_numpy(x0).to(self.device, self.td), torch.from_numpy(xt).to(self.device, self.td),
                    saved, info)
        x0, x0s = self._vae_encode(frames_m, seed)
        xt, saved = self._invert(x0s, control, text, ts, flatten, keep)
        xtn = xt.float().cpu().numpy()
        if url:
            buf = io.BytesIO()
            np.savez(buf, x0=x0.float().cpu().numpy(), xT=xtn, pnp_ts=np.array(sorted(saved), dtype=np.int64),
                     **{f"pnp_{t}": v.float().cpu().numpy() for t, v in saved.items()})
            storage.write_bytes_atomic(url, buf.getvalue(), so)
        return x0, xt, saved, {"cache_key": key, "inverted": True,
                               "xT_sha": hashlib.sha256(xtn.tobytes()).hexdigest()[:16]}

    # ------------------------------------------------------------------ farm contract

    def _video_params(self, params: dict[str, Any]) -> dict[str, Any]:
        p = {**self.p, **{k: v for k, v in params.items() if k in PER_VIDEO}}
        self.validate_params({k: p[k] for k in PER_VIDEO if p[k] is not None}, complete=True)
        p["local_prompts"], p["masks"] = _as_list(p["local_prompts"], "local_prompts"), _as_list(p["masks"], "masks")
        return p

    def _clip_inputs(self, frames: np.ndarray, p: dict[str, Any], so: dict[str, Any], size: tuple[int, int],
                     indices: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Frames, masks ``bool [R, T, h, w]`` and control ``uint8 [T, h, w, 3]`` at model size."""
        from actors.masks import read_mask_frames, runs

        frames_m = self._resize_u8(frames, size)
        masks = np.stack([read_mask_frames(u, 0, 0, size, so, indices=indices) for u in p["masks"]])
        supplied = None
        if p["control_video"] and self.controlnet is not None:
            from farm.video import VideoError, read_frames

            try:
                supplied = np.stack([f for i in runs(indices) for f in read_frames(p["control_video"], *i, so)])
            except (VideoError, OSError, ValueError) as e:
                raise ModelError(f"videograin: control_video {p['control_video']!r}: {str(e).splitlines()[0]}") from e
            if len(supplied) != len(indices):
                raise ModelError(f"videograin: control_video {p['control_video']!r}: fewer frames than the video")
        return frames_m, masks, self._control(frames_m, supplied)

    def prepare(self, video: VideoContext) -> dict[str, Any]:
        """Prompts encoded once per video, and the anchors' edit: their latent at every step."""
        import torch

        self._need()
        p = self._video_params(video.params)
        so = dict(video.storage_options)
        size = self.model_size(video.height, video.width)
        text = self.encode_prompts(p["prompt"], p["local_prompts"], p["source_prompt"], p["negative_prompt"])
        cond: dict[str, Any] = {"params": {k: p[k] for k in PER_VIDEO}, "storage_options": so, "size": size,
                                "text": text, "frame_size": (video.height, video.width), "anchors": None,
                                "frame_count": video.frame_count}
        n = min(int(p["anchors"]), video.frame_count)
        if n:
            span = min(int(p["anchor_span"] or video.frame_count), video.frame_count)
            idx = sorted({int(round(i)) for i in np.linspace(0, span - 1, n)})
            from farm.video import read_frames

            frames = np.stack([f for i in idx for f in read_frames(video.url, i, i + 1, storage_options=so)])
            frames_m, masks, control_u8 = self._clip_inputs(frames, p, so, size, idx)
            ts = self._timesteps()
            seed = int(p["seed"]) + 7919
            # The anchors are far-apart frames edited by themselves: no FLATTEN (no flow between them) and no
            # PnP, so that every clip can reproduce their keys/values exactly.
            pa = {**p, "flatten_res": [], "use_pnp": False}
            with torch.inference_mode():
                control = None if control_u8 is None else self._tensor(control_u8)
                x0, xt, _, info = self._inverted(frames_m, control_u8, control, text, ts, pa, so, seed, None)
                layouts = self._layouts(masks)
                _, traj = self._edit(xt, x0, control, layouts, text, ts, seed, None, "clip")
            traj_np = torch.stack(traj).float().cpu().numpy()  # [steps, A, 4, h, w]
            fp = self.ctx.fingerprint
            cond["anchors"] = {"index": np.array(idx), "traj": traj_np, "masks": masks, "control": control_u8,
                               "fingerprint": np.array(fp, dtype=np.float64),
                               "id": hashlib.sha256(traj_np.tobytes()).hexdigest()[:16]}
            self._trace(p["trace"], "prepare.json", {"anchor_frames": idx, "anchor_id": cond["anchors"]["id"],
                                                     "fingerprint": fp, **info}, so)
        return cond

    def render(self, frames: np.ndarray, cond: Any, state: State | None, span: tuple[int, int] | None = None
               ) -> tuple[Outputs, State | None]:
        """Edit one clip ``uint8 [T, H, W, 3]`` (video frames ``span``) -> ``{"rgb": float32 [T, H, W, 3]}``."""
        import torch
        import torch.nn.functional as F

        self._need()
        if not isinstance(cond, dict) or "text" not in cond:
            raise ModelError("videograin: no prompts to edit with (prepare() was not run for this video)")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ModelError(f"videograin: frames must be [T, H, W, 3] RGB (got {frames.shape})")
        t_n, hh, ww = frames.shape[:3]
        if (hh, ww) != tuple(cond["frame_size"]):
            raise ModelError(f"videograin: frames are {ww}x{hh}, prepare() saw {cond['frame_size'][1]}x"
                             f"{cond['frame_size'][0]}")
        if t_n == 0:
            return {"rgb": np.zeros((0, hh, ww, 3), dtype=np.float32)}, None
        start, stop = span if span is not None else (0, t_n)
        p = {**self.p, **cond["params"]}
        so = cond["storage_options"]
        size = tuple(cond["size"])
        frames_m, masks, control_u8 = self._clip_inputs(frames, p, so, size, list(range(start, stop)))
        ts = self._timesteps()
        text = cond["text"]
        # A clip that is the whole video is edited exactly as upstream edits it: no anchors.
        whole = (start, stop) == (0, int(cond.get("frame_count", stop)))
        anc = None if whole else cond.get("anchors")
        seed = int(p["seed"]) + int(start)
        with torch.inference_mode():
            control = None if control_u8 is None else self._tensor(control_u8)
            lat_hw = (frames_m.shape[1] // self.vae_factor, frames_m.shape[2] // self.vae_factor)
            flatten = self._flatten(frames_m, p, lat_hw)
            x0, xt, saved, info = self._inverted(frames_m, control_u8, control, text, ts, p, so, seed, flatten)
            anchors = None
            if anc is not None:
                if anc["traj"].shape[0] != len(ts) or tuple(anc["traj"].shape[-2:]) != lat_hw:
                    raise ModelError("videograin: the anchors were edited at other steps/strength/size than this clip")
                traj = torch.from_numpy(np.array(anc["traj"])).to(self.device, self.td)
                anchors = {"traj": traj, "traj_t": list(traj), "layouts": self._layouts(anc["masks"]),
                           "control": None if anc["control"] is None else self._tensor(anc["control"])}
            layouts = self._layouts(masks)
            x, _ = self._edit(xt, x0, control, layouts, text, ts, seed + 1_000_003, anchors,
                              "anchors" if anchors is not None else None, flatten, saved)
            fp = self.ctx.fingerprint
            out = torch.from_numpy(self._vae_decode(x)).permute(0, 3, 1, 2)  # [T, 3, h, w]
            if out.shape[-2:] != (hh, ww):
                out = F.interpolate(out, size=(hh, ww), mode="bilinear", antialias=True, align_corners=False)
            rgb = out.clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
        if p["keep_background"]:
            from actors.masks import read_mask_frames

            full = np.stack([read_mask_frames(u, start, stop, (hh, ww), so) for u in p["masks"]]).any(0)
            alpha = soft_mask(full, int(p["feather"]))  # [T, H, W, 1]: 1 on the masks, fading outside
            rgb = alpha * rgb + (1 - alpha) * (frames.astype(np.float32) / 255)
        self._trace(p["trace"], f"clip-{start:06d}-{stop:06d}.json", {
            "span": [start, stop], "anchor_id": None if anc is None else anc["id"],
            "anchor_fingerprint": None if anc is None else [float(v) for v in anc["fingerprint"]],
            "fingerprint": fp, **info}, so)
        return {"rgb": rgb}, None

    def _trace(self, prefix: str | None, name: str, record: dict[str, Any], so: dict[str, Any]) -> None:
        if prefix:
            from farm import storage

            storage.write_bytes_atomic(storage.join(prefix, name), json.dumps(record, indent=1).encode(), so)



def soft_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """``bool [T, H, W]`` -> ``float32 [T, H, W, 1]``: 1 on the mask, falling to 0 over ``radius`` px outside."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.float32))[:, None]
    grow, blur = (radius + 1) // 2, radius // 2  # grow, then blur no wider than grown: 1 on the mask
    if grow:
        m = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)
    if blur:
        m = F.avg_pool2d(m, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
    return m[:, 0, :, :, None].numpy()
