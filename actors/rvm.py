"""Robust Video Matting as a farm model: alpha and foreground for people, with a recurrent state.

RVM carries four ConvGRU states from frame to frame, so a shard that starts mid-video is only exact when
it gets the previous shard's final state: the window is ``state="handoff"``. The state is the four
tensors ``r1..r4`` as float32 arrays with their batch dim (``[1, C, h/2^k, w/2^k]``); their sizes depend
on the frame size and the downsample ratio, and a state that does not fit is refused.

The network itself lives in ``actors/rvm_net.py`` (pure torch, official checkpoint layout).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoModel, WindowSpec, check_state, device_frames

STATE_KEYS = ("r1", "r2", "r3", "r4")
VARIANTS = ("mobilenetv3", "resnet50")  # as in rvm_net; repeated so that building the adapter needs no torch
REFINERS = ("deep_guided_filter", "fast_guided_filter")
AUTO_LONG_SIDE = 512  # RVM's convert_video "auto" ratio: work at about 512 px on the long side


def auto_downsample_ratio(height: int, width: int) -> float:
    """The ratio RVM's ``convert_video`` picks when none is given."""
    return min(1.0, AUTO_LONG_SIDE / max(height, width))


class RVM(VideoModel):
    """Params: ``variant`` ("mobilenetv3" or "resnet50"), ``refiner`` ("deep_guided_filter" or
    "fast_guided_filter"), ``downsample_ratio`` (None = auto, long side about 512 px), ``seq_chunk``
    (frames per forward pass: bounds memory, does not change the result)."""

    name: ClassVar[str] = "rvm"
    window: ClassVar[WindowSpec] = WindowSpec(frames=64, overlap=0, state="handoff", preroll=0)
    outputs: ClassVar[tuple[str, ...]] = ("alpha", "fgr")
    needs_weights: ClassVar[bool] = True

    def __init__(
        self,
        variant: str = "mobilenetv3",
        refiner: str = "deep_guided_filter",
        downsample_ratio: float | None = None,
        seq_chunk: int = 12,
    ) -> None:
        super().__init__(variant=variant, refiner=refiner, downsample_ratio=downsample_ratio, seq_chunk=seq_chunk)
        if variant not in VARIANTS:
            raise ModelError(f"rvm: variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
        if refiner not in REFINERS:
            raise ModelError(f"rvm: refiner must be one of {', '.join(REFINERS)} (got {refiner!r})")
        if downsample_ratio is not None and not 0 < float(downsample_ratio) <= 1:
            raise ModelError(f"rvm: downsample_ratio must be in (0, 1] or None for auto (got {downsample_ratio})")
        if int(seq_chunk) < 1:
            raise ModelError(f"rvm: seq_chunk must be >= 1 (got {seq_chunk})")
        self.variant, self.refiner = variant, refiner
        self.downsample_ratio = None if downsample_ratio is None else float(downsample_ratio)
        self.seq_chunk = int(seq_chunk)
        self.net: Any = None  # MattingNetwork once loaded; torch is imported only then
        self.device: Any = None
        self.dtype: Any = None

    # -- weights -------------------------------------------------------------------------------------

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """Load a resolved weights file: ``.pth`` (``weights_only``), ``.safetensors`` or the official ONNX export."""
        if not weights:
            raise ModelError("rvm: needs weights (e.g. rvm-mobilenetv3, a .pth, .safetensors or the ONNX export)")
        from farm.weights import load_state_dict

        self.load_weights_dict(load_state_dict(weights), device=device, dtype=dtype)

    def load_weights_dict(self, sd: dict[str, Any], device: str = "cpu", dtype: str = "float32") -> None:
        """Build the network from an in-memory state dict (official ``MattingNetwork`` layout, strict).

        The published checkpoints carry the deep guided filter; with ``refiner="fast_guided_filter"``
        (which has no parameters) those ``refiner.*`` keys are dropped rather than refused.
        """
        import torch

        from actors.rvm_net import MattingNetwork

        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ModelError(f"rvm: dtype must be one of {', '.join(dtypes)} (got {dtype!r})")
        if self.refiner == "fast_guided_filter":
            sd = {k: v for k, v in sd.items() if not k.startswith("refiner.")}
        net = MattingNetwork(self.variant, self.refiner)
        try:
            result = net.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape (another variant's checkpoint?)
            detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise ModelError(f"rvm: weights do not fit the {self.variant} layout: {detail}") from e
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"rvm: weights do not fit the {self.variant} layout: {len(result.missing_keys)} missing "
                f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:2]})"
            )
        self.device, self.dtype = torch.device(device), dtypes[dtype]
        self.net = net.eval().to(self.device, self.dtype)

    def memory_bytes(self) -> int:
        if self.net is None or self.device.type == "cpu":
            return 0
        tensors = [*self.net.parameters(), *self.net.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- rendering -----------------------------------------------------------------------------------

    def ratio_for(self, height: int, width: int) -> float:
        return self.downsample_ratio if self.downsample_ratio is not None else auto_downsample_ratio(height, width)

    def state_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """What a handed-off state must look like for frames of this size."""
        from actors.rvm_net import state_shapes

        return dict(state_shapes(self.variant, height, width, self.ratio_for(height, width)))

    def render(self, frames: np.ndarray, cond: Any, state: State | None) -> tuple[Outputs, State | None]:
        if self.net is None:
            raise ModelError("rvm: render before load (no weights loaded)")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ModelError(f"rvm: frames must be uint8 [T, H, W, 3] (got {frames.dtype} {frames.shape})")
        import torch

        t, h, w, _ = frames.shape
        ratio = self.ratio_for(h, w)
        from actors.rvm_net import small_size

        if min(small_size(h, w, ratio)) < 2:
            raise ModelError(f"rvm: {w}x{h} frames at downsample_ratio {ratio:g} leave nothing to work on")
        check_state(state, self.state_shapes(h, w), self.name)
        rec: list[Any] = [None] * 4
        if state is not None:
            rec = [
                torch.from_numpy(np.array(state[k])).to(  # a copy: object-store arrays are read-only
                    self.device, self.dtype
                )
                for k in STATE_KEYS
            ]
        alpha = np.empty((t, h, w, 1), np.float32)
        fgr = np.empty((t, h, w, 3), np.float32)
        with torch.inference_mode():
            src = device_frames(frames, self.device)  # [T, H, W, 3] uint8 (on CUDA, uploaded while the last ran)
            for start in range(0, t, self.seq_chunk):
                stop = min(t, start + self.seq_chunk)
                x = src[start:stop]
                # /255 in float32 whatever the model dtype, then cast: [1, t, 3, H, W]
                x = (x.permute(0, 3, 1, 2).to(torch.float32) / 255).to(self.dtype).unsqueeze(0)
                f, p, *rec = self.net(x, *rec, downsample_ratio=ratio)  # f [1, t, 3, H, W], p [1, t, 1, H, W]
                fgr[start:stop] = f[0].permute(0, 2, 3, 1).float().cpu().numpy()
                alpha[start:stop] = p[0].permute(0, 2, 3, 1).float().cpu().numpy()
        if rec[0] is None:  # no frames: nothing advanced
            return {"alpha": alpha, "fgr": fgr}, state
        # [1, C, h_k, w_k] float32 whatever the model dtype: portable, and exact for float16/bfloat16
        new_state = {k: r.float().cpu().numpy() for k, r in zip(STATE_KEYS, rec, strict=True)}
        return {"alpha": alpha, "fgr": fgr}, new_state
