"""Generative Video Matting (aim-uofa/GVM, SIGGRAPH 2025) as a farm model: alpha from an SVD-style video UNet.

One readable file in the spirit of a diffusers pipeline: ``load`` (diffusers-format folder: ``vae/``,
``unet/``, ``scheduler/``, optional LoRA), ``prepare`` (nothing per video), ``render`` (one window).

The matting step, as upstream's ``GVMPipeline``::

    frames -> resize (short side ``size``, long side <= ``max_size``) -> zero-pad (centred) to a multiple of 32
           -> VAE encode (latent_dist.mode() * scaling_factor)                          video latents [1, T, 4, h, w]
    alpha latents: zeros (upstream's default one-step mode: t = 999, the UNet's output *is* the latent)
                   or seeded Gaussian noise integrated by a flow-matching Euler scheduler ("gaussian")
    UNet(cat([alpha latents, video latents], channel axis), t, zero image embedding)  -> alpha latents
    VAE temporal decode -> mean over RGB -> * 0.5 + 0.5 -> clamp -> crop pad -> resize to the source size
    -> snap: >= 240/255 is 1, <= 25/255 is 0 (upstream demo's thresholds)

Windows are farm shards (``state="none"``): they render in parallel on actors and the frames two shards
share are blended by the stitcher with a ramp, where upstream's demo cuts hard between batches.

Differences from upstream, on purpose:
- Upstream's UNet is diffusers' ``UNetSpatioTemporalConditionModel`` with the added-time embedding
  removed. Its checkpoint therefore lacks ``add_embedding.*``; we load it into diffusers' own class and
  zero that embedding's output layer, which makes ``added_time_ids`` contribute exactly nothing.
- Upstream runs an ensemble of 3 members and takes the max. With zero noise their latents are equal (the
  UNet runs once here), and they differ only where upstream's VAE decodes the members' frames as one
  sequence and a ``decode_chunk_size`` chunk straddles two members. farm's default ``ensemble`` is 1: equal
  to upstream's 3 whenever the chunk divides ``window.frames`` (the defaults 16/16); ``ensemble: 3``
  reproduces upstream's decode for any chunk.
- The LoRA (peft format: ``adapter_config.json`` + ``pytorch_lora_weights.{safetensors,pt}``) is merged
  into the UNet's weights at load (``W += alpha/r * B @ A``, what peft's ``merge_and_unload`` does), so
  neither peft nor its per-layer adapter hooks are needed at render time.
- Gaussian noise is drawn per video frame from ``(seed, frame index)``, so a frame two shards share gets
  the same noise in both, and the result does not depend on how the video was sharded into windows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoModel, WindowSpec
from actors.offload import Offload, memory_mode

_DTYPES = ("float32", "float16", "bfloat16")
NOISE = ("zeros", "gaussian")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.pt", "pytorch_lora_weights.bin",
              "adapter_model.safetensors", "adapter_model.bin")
# SVD's micro-conditioning [fps - 1, motion_bucket_id, noise_aug_strength]; used only by a UNet whose
# checkpoint has an added-time embedding (GVM's has none, see above).
SVD_TIME_IDS = (6.0, 127.0, 0.02)


def resized_size(height: int, width: int, size: int | None, max_size: int | None) -> tuple[int, int]:
    """torchvision ``Resize(size, max_size)``: the short side becomes ``size``, the long side stays <= max_size."""
    short, long = min(height, width), max(height, width)
    new_short, new_long = (short, long) if size is None else (size, int(size * long / short))
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def frame_noise(seed: int, frame: int, member: int, shape: tuple[int, ...]) -> np.ndarray:
    """``float32`` Gaussian noise of one video frame, the same in whichever shard renders that frame."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, frame, member]))
    return rng.standard_normal(shape, dtype=np.float32)


class GVM(VideoModel):
    """Params: ``size`` (short side the network sees; None = source size), ``max_size`` (cap on the long
    side), ``pad_multiple`` (32), ``steps`` (1), ``noise`` ("zeros", upstream's one-step default, or
    "gaussian": flow-matching Euler from seeded noise), ``seed``, ``ensemble`` (members, max taken),
    ``decode_chunk_size`` (frames the temporal VAE decodes at once), ``low``/``high`` (alpha snapped to
    0 / 1 beyond these), ``memory`` (``actors.offload``: "full", also spelt "gpu"; "model_offload",
    "sequential", "group_offload"), ``lora`` ("auto": ``unet/adapter_config.json`` when present; a path;
    or null), ``lora_scale``,
    ``added_time_ids`` (SVD micro-conditioning; ignored by GVM's own UNet)."""

    name: ClassVar[str] = "gvm"
    window: ClassVar[WindowSpec] = WindowSpec(frames=16, overlap=4, state="none")
    outputs: ClassVar[tuple[str, ...]] = ("alpha",)
    needs_weights: ClassVar[bool] = True
    chunk_frames: ClassVar[int | None] = None  # the UNet sees the whole window at once
    takes_span: ClassVar[bool] = True  # frame indices seed the per-frame noise

    def __init__(
        self,
        size: int | None = 720,
        max_size: int | None = 1024,
        pad_multiple: int = 32,
        steps: int = 1,
        noise: str = "zeros",
        seed: int = 0,
        ensemble: int = 1,
        decode_chunk_size: int = 16,
        low: float = 25 / 255,
        high: float = 240 / 255,
        memory: str = "full",
        lora: str | None = "auto",
        lora_scale: float = 1.0,
        added_time_ids: list[float] | tuple[float, ...] = SVD_TIME_IDS,
    ) -> None:
        super().__init__(size=size, max_size=max_size, pad_multiple=pad_multiple, steps=steps, noise=noise,
                         seed=seed, ensemble=ensemble, decode_chunk_size=decode_chunk_size, low=low, high=high,
                         memory=memory, lora=lora, lora_scale=lora_scale, added_time_ids=list(added_time_ids))
        for key, value, lo in (("size", size, 8), ("max_size", max_size, 8), ("pad_multiple", pad_multiple, 1),
                               ("steps", steps, 1), ("ensemble", ensemble, 1),
                               ("decode_chunk_size", decode_chunk_size, 1)):
            if value is not None and (not isinstance(value, int) or value < lo):
                raise ModelError(f"gvm: {key} must be an integer >= {lo} (got {value!r})")
        if noise not in NOISE:
            raise ModelError(f"gvm: noise must be one of {', '.join(NOISE)} (got {noise!r})")
        if not 0 <= float(low) < float(high) <= 1:
            raise ModelError(f"gvm: need 0 <= low < high <= 1 (got low={low}, high={high})")
        self.size, self.max_size, self.pad_multiple = size, max_size, pad_multiple
        self.steps, self.noise, self.seed = steps, noise, int(seed)
        self.ensemble = ensemble
        self.decode_chunk_size, self.low, self.high = decode_chunk_size, float(low), float(high)
        self.memory, self.lora, self.lora_scale = memory_mode(memory, "gvm"), lora, float(lora_scale)
        self.added_time_ids = [float(v) for v in added_time_ids]
        self.vae: Any = None
        self.unet: Any = None
        self.scheduler_config: dict[str, Any] = {}
        self.device: Any = None
        self.dtype: Any = None
        self.lora_merged: str | None = None  # the LoRA file merged at load, for the record
        self.time_embedding_zeroed = False

    # -- weights -------------------------------------------------------------------------------------

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """Load a diffusers-format folder: ``vae/`` (AutoencoderKLTemporalDecoder), ``unet/``
        (UNetSpatioTemporalConditionModel), ``scheduler/`` (FlowMatchEulerDiscreteScheduler, optional)."""
        if not weights:
            raise ModelError("gvm: needs weights: a diffusers-format folder with vae/, unet/, scheduler/ "
                             "(local path, hf://org/repo/ or s3://bucket/prefix/)")
        if dtype not in _DTYPES:
            raise ModelError(f"gvm: dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        root = Path(weights)
        if not root.is_dir():
            raise ModelError(f"gvm: weights {weights} is not a folder (expected vae/, unet/, scheduler/ inside)")
        for sub in ("vae", "unet"):
            if not (root / sub / "config.json").is_file():
                raise ModelError(f"gvm: weights folder {weights} has no {sub}/config.json")
        import torch
        from diffusers import AutoencoderKLTemporalDecoder, FlowMatchEulerDiscreteScheduler
        from diffusers import UNetSpatioTemporalConditionModel as UNet
        from diffusers.utils import logging as diffusers_logging

        torch_dtype = getattr(torch, dtype)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # GVM's UNet lacks add_embedding.*: handled below, not news
        try:
            vae = AutoencoderKLTemporalDecoder.from_pretrained(root / "vae", torch_dtype=torch_dtype)
            unet, info = UNet.from_pretrained(root / "unet", torch_dtype=torch_dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"gvm: cannot load {weights}: {str(e).strip().splitlines()[0]}") from e
        finally:
            diffusers_logging.set_verbosity(verbosity)
        missing = list(info.get("missing_keys", []))
        others = [k for k in missing if not k.startswith("add_embedding.")]
        if others:
            raise ModelError(f"gvm: unet weights lack {len(others)} tensors (e.g. {others[:2]}): not a GVM/SVD UNet")
        if missing:  # GVM's checkpoint: no added-time embedding. Zeroed (missing tensors may be left
            with torch.no_grad():  # uninitialised, NaN included), it adds exactly 0, as GVM's own UNet
                for param in unet.add_embedding.parameters():
                    param.zero_()
            self.time_embedding_zeroed = True
        n_ids = unet.config.projection_class_embeddings_input_dim // unet.config.addition_time_embed_dim
        if not self.time_embedding_zeroed and len(self.added_time_ids) != n_ids:
            raise ModelError(f"gvm: added_time_ids needs {n_ids} values for this UNet (got {self.added_time_ids})")
        self.added_time_ids = (self.added_time_ids + [0.0] * n_ids)[:n_ids]
        self.lora_merged = self._merge_lora(unet, root)
        sched = root / "scheduler"
        config = (FlowMatchEulerDiscreteScheduler.load_config(sched) if (sched / "scheduler_config.json").is_file()
                  else {})
        self.scheduler_config = dict(FlowMatchEulerDiscreteScheduler.from_config(config).config)
        self.vae, self.unet = vae.eval().requires_grad_(False), unet.eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), torch_dtype
        self._place()

    def _place(self) -> None:
        """Put the models where the memory mode wants them (``actors.offload``)."""
        self.offload = Offload(self.memory, self.device, lambda: [self.vae, self.unet])
        self.offload.place()

    def _merge_lora(self, unet: Any, root: Path) -> str | None:
        """Merge a peft-format LoRA into the UNet's weights; returns the file merged (or None)."""
        if self.lora is None or self.lora is False:
            return None
        folder = root / "unet" if self.lora == "auto" else Path(self.lora)
        if not folder.is_absolute() and self.lora != "auto":
            folder = root / folder
        if self.lora == "auto" and not (folder / "adapter_config.json").is_file():
            return None
        if folder.is_file():
            folder, files = folder.parent, [folder]
        else:
            files = [folder / n for n in LORA_FILES if (folder / n).is_file()]
        if not files:
            raise ModelError(f"gvm: no LoRA weights in {folder} (expected one of {', '.join(LORA_FILES)})")
        cfg_path = folder / "adapter_config.json"
        if not cfg_path.is_file():
            raise ModelError(f"gvm: LoRA {files[0]} has no adapter_config.json beside it (r, lora_alpha)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("use_dora"):
            raise ModelError(f"gvm: {cfg_path}: DoRA adapters are not supported (use_dora: true)")
        from farm.weights import WeightsError, load_state_dict

        try:
            sd = load_state_dict(files[0])
        except WeightsError as e:
            raise ModelError(f"gvm: {e}") from e
        merge_lora(unet, sd, cfg, self.lora_scale, str(files[0]))
        return str(files[0])

    def memory_bytes(self) -> int:
        """Bytes of weights resident on the accelerator now (offload modes keep them on the CPU)."""
        return 0 if self.unet is None else self.offload.resident_bytes()

    # -- rendering -----------------------------------------------------------------------------------

    def render(
        self, frames: np.ndarray, cond: Any, state: State | None, span: tuple[int, int] | None = None
    ) -> tuple[Outputs, State | None]:
        if self.unet is None:
            raise ModelError("gvm: render before load (no weights loaded)")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ModelError(f"gvm: frames must be uint8 [T, H, W, 3] (got {frames.dtype} {frames.shape})")
        import torch

        start = span[0] if span is not None else 0
        with torch.inference_mode():
            rgb, crop = self.preprocess(frames)  # [1, T, 3, Hp, Wp] in [-1, 1], pad box
            video_latents = self.encode(rgb)  # [1, T, 4, h, w]
            if self.noise == "zeros":
                # Upstream's members are the same latents, so the UNet runs once; its VAE decodes the members'
                # frames as ONE sequence in decode_chunk_size chunks, so members whose frames straddle a chunk
                # boundary differ, and the max is taken over them. With a chunk that divides the window they
                # are identical and ensemble 1 is exact.
                latents = self.denoise(video_latents, start, 0)
                members = self.decode(latents.repeat(1, self.ensemble, 1, 1, 1))  # [E*T, 1, Hp, Wp]
                alpha = members.unflatten(0, (self.ensemble, -1)).amax(dim=0)
            else:
                alpha = None
                for member in range(self.ensemble):
                    a = self.decode(self.denoise(video_latents, start, member))  # [T, 1, Hp, Wp] in [0, 1]
                    alpha = a if alpha is None else torch.maximum(alpha, a)
            out = self.postprocess(alpha, crop, frames.shape[1:3])
        return {"alpha": out}, None

    def preprocess(self, frames: np.ndarray) -> tuple[Any, tuple[int, int, int, int]]:
        """uint8 ``[T, H, W, 3]`` -> ``[1, T, 3, Hp, Wp]`` in [-1, 1], resized and zero-padded (centred)."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W]
        h, w = resized_size(frames.shape[1], frames.shape[2], self.size, self.max_size)
        if (h, w) != frames.shape[1:3]:
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        m = self.pad_multiple
        hp, wp = -(-h // m) * m, -(-w // m) * m
        top, left = (hp - h) // 2, (wp - w) // 2
        padded = torch.zeros((x.shape[0], 3, hp, wp))  # black, as upstream's impad_multi
        padded[:, :, top : top + h, left : left + w] = x
        return (padded * 2 - 1).unsqueeze(0), (top, left, h, w)

    def encode(self, rgb: Any) -> Any:
        """``[1, T, 3, H, W]`` -> video latents ``[1, T, C, h, w]`` (the encoder is per frame: chunks are exact)."""
        import torch

        t = rgb.shape[1]
        out = []
        with self.offload.use(self.vae) as vae:
            for i in range(0, t, self.decode_chunk_size):
                chunk = rgb[0, i : i + self.decode_chunk_size].to(self.device, self.dtype)
                out.append(vae.encode(chunk).latent_dist.mode() * vae.config.scaling_factor)
        return torch.cat(out).unsqueeze(0)

    def denoise(self, video_latents: Any, start: int, member: int) -> Any:
        """Alpha latents ``[1, T, C, h, w]`` conditioned on the video latents (channel-concatenated)."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        b, t = video_latents.shape[:2]
        cfg = self.unet.config
        cad = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
        image_embeddings = torch.zeros((b, 1, cad), device=self.device, dtype=self.dtype)  # GVM: no CLIP image
        time_ids = torch.tensor([self.added_time_ids] * b, device=self.device, dtype=self.dtype)
        with self.offload.use(self.unet) as unet:
            if self.noise == "zeros":  # upstream's default: zero latents at the last training timestep
                latents = torch.zeros_like(video_latents)
                timesteps = [torch.tensor(self.scheduler_config["num_train_timesteps"] - 1, device=self.device)]
                timesteps = timesteps * self.steps
                scheduler = None
            else:
                noise = np.stack([frame_noise(self.seed, start + i, member, tuple(video_latents.shape[2:]))
                                  for i in range(t)])  # [T, C, h, w], drawn on the CPU: device-independent
                latents = torch.from_numpy(noise).unsqueeze(0).to(self.device, self.dtype)
                scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)  # per call: no state
                scheduler.set_timesteps(self.steps, device=self.device)
                timesteps = scheduler.timesteps
            for ts in timesteps:
                x = torch.cat([latents, video_latents], dim=2)  # [1, T, 2C, h, w]
                pred = unet(x, ts, encoder_hidden_states=image_embeddings, added_time_ids=time_ids).sample
                latents = pred if scheduler is None else scheduler.step(pred, ts, latents).prev_sample
        return latents

    def decode(self, latents: Any) -> Any:
        """Alpha latents -> ``[T, 1, H, W]`` float32 alpha: temporal VAE decode, mean over RGB, [-1, 1] -> [0, 1]."""
        import torch

        z = latents[0] / self.vae.config.scaling_factor
        out = []
        with self.offload.use(self.vae) as vae:
            for i in range(0, z.shape[0], self.decode_chunk_size):
                chunk = z[i : i + self.decode_chunk_size].to(self.dtype)
                out.append(vae.decode(chunk, num_frames=chunk.shape[0]).sample.float())
        rgb = torch.cat(out)  # [T, 3, H, W]
        return (rgb.mean(dim=1, keepdim=True) * 0.5 + 0.5).clamp(0, 1)

    def postprocess(self, alpha: Any, crop: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
        """Crop the pad, resize to the source, snap near-0 / near-1: ``float32 [T, H, W, 1]``."""
        import torch.nn.functional as F

        top, left, h, w = crop
        a = alpha[:, :, top : top + h, left : left + w].float().cpu()
        if (h, w) != tuple(size):
            a = F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
        a = a.clamp(0, 1)
        a[a >= self.high] = 1.0
        a[a <= self.low] = 0.0
        return np.ascontiguousarray(a.permute(0, 2, 3, 1).numpy(), dtype=np.float32)


# -------------------------------------------------------------------------------------------------- LoRA

_PREFIXES = ("base_model.model.", "model.", "unet.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight$")


def merge_lora(unet: Any, sd: dict[str, Any], cfg: dict[str, Any], scale: float, source: str) -> int:
    """``W += scale * s * B @ A`` for every LoRA pair, ``s = lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA;
    per-module ``rank_pattern`` / ``alpha_pattern`` as peft). Returns the number of layers merged."""
    import torch

    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ModelError(f"gvm: {source}: {key!r} is not a peft LoRA key (<module>.lora_A/B.weight)")
        name = m["module"]
        for p in _PREFIXES:
            name = name.removeprefix(p)
        pairs.setdefault(name, {})[m["which"]] = tensor
    modules = dict(unet.named_modules())
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", cfg.get("r", 8)))
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelError(f"gvm: {source}: LoRA for {name!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "weight"):
            raise ModelError(f"gvm: {source}: LoRA targets {name!r}, which this UNet does not have")
        r = _pattern(cfg.get("rank_pattern") or {}, name, r0)
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name, alpha0)
        s = scale * (alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r)
        a, b = ab["A"].float(), ab["B"].float()
        delta = (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape)  # Linear, or Conv (B is 1x1)
        with torch.no_grad():
            layer.weight.copy_((layer.weight.float() + s * delta.to(layer.weight.device)).to(layer.weight.dtype))
    return len(pairs)


def _pattern(patterns: dict[str, Any], name: str, default: float) -> float:
    """peft's per-module override: a key matches a module whose name ends in ``.<key>`` (or is it)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", name):
            return float(value)
    return float(default)
