"""FTP-VM: video matting from one trimap, propagated through the video (csvt32745/FTP-VM, CVPR 2023).

The user gives a trimap (0 background, 128 unknown, 255 foreground) for one frame of the video.
``prepare`` encodes that frame and trimap once into the memory key/value (shared by every shard);
``render`` matts each shard against it, carrying the decoders' ConvGRU states from shard to shard.

Frames are zero-padded (centred) to a multiple of 16 before the network and the matte is cropped
back, as the official inference does; the network itself lives in ``actors/ftpvm_net.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from actors.base import ModelError, Outputs, State, VideoContext, VideoModel, WindowSpec, check_state

_DTYPES = ("float32", "float16", "bfloat16")
# GRU state name -> (channels, stride) relative to the (downsampled, padded) network input.
_STATE = {"rec_seg_8": (48, 8), "rec_seg_16": (64, 16), "rec_mat_1": (8, 1), "rec_mat_2": (16, 2)}


def _pad16(n: int) -> int:
    return n + (-n % 16)


def read_trimap(url: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """``uint8 [H, W]`` trimap from a local path or fsspec URL (any image PIL reads; made greyscale)."""
    from farm.video import VideoError, read_image

    try:
        return read_image(url, storage_options, mode="L")
    except VideoError as e:
        raise ModelError(f"ftpvm: trimap {e}") from None


class FTPVM(VideoModel):
    """Params: ``trimap`` (image path/URL, the video's size), ``memory_frame`` (the frame it belongs to),
    ``downsample_ratio`` (network scale; below 1 a fast guided filter restores full resolution),
    ``seq_chunk`` (frames per network call). ``trimap``/``memory_frame`` in the video's params win."""

    name: ClassVar[str] = "ftpvm"
    window: ClassVar[WindowSpec] = WindowSpec(frames=64, overlap=0, state="handoff")
    outputs: ClassVar[tuple[str, ...]] = ("alpha",)
    needs_weights: ClassVar[bool] = True

    def __init__(
        self,
        trimap: str | None = None,
        memory_frame: int = 0,
        downsample_ratio: float = 1.0,
        seq_chunk: int = 4,
    ) -> None:
        super().__init__(
            trimap=trimap, memory_frame=memory_frame, downsample_ratio=downsample_ratio, seq_chunk=seq_chunk
        )
        if not 0 < float(downsample_ratio) <= 1:
            raise ModelError(f"ftpvm: downsample_ratio must be in (0, 1] (got {downsample_ratio})")
        if int(seq_chunk) < 1:
            raise ModelError(f"ftpvm: seq_chunk must be >= 1 (got {seq_chunk})")
        self.trimap, self.memory_frame = trimap, int(memory_frame)
        self.downsample_ratio, self.seq_chunk = float(downsample_ratio), int(seq_chunk)
        self.net: Any = None
        self.device, self.dtype = "cpu", "float32"

    # ------------------------------------------------------------------ weights

    def load(self, weights: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        """Load a resolved weights file: ``.pth`` (``weights_only``) or ``.safetensors``; strict."""
        if not weights:
            raise ModelError("ftpvm: needs weights (a .pth or .safetensors state dict)")
        from farm.weights import load_state_dict

        self.load_weights_dict(load_state_dict(weights), device, dtype)

    def load_weights_dict(self, sd: dict[str, Any], device: str = "cpu", dtype: str = "float32") -> None:
        """Build the network from an already-loaded state dict (official layout, strict)."""
        import torch

        from actors.ftpvm_net import FTPVMNet

        if dtype not in _DTYPES:
            raise ModelError(f"ftpvm: dtype must be one of {', '.join(_DTYPES)} (got {dtype!r})")
        net = FTPVMNet()
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelError(f"ftpvm: weights do not fit the FTP-VM layout: {str(e).splitlines()[0]}") from e
        self.net = net.eval().to(device=device, dtype=getattr(torch, dtype))
        self.device, self.dtype = device, dtype

    def memory_bytes(self) -> int:
        if self.net is None or self.device == "cpu":
            return 0
        return sum(p.numel() * p.element_size() for p in self.net.parameters())

    def _need_net(self) -> None:
        if self.net is None:
            raise ModelError("ftpvm: load() the weights before prepare/render")

    # ------------------------------------------------------------------ memory (once per video)

    def prepare(self, video: VideoContext) -> dict[str, np.ndarray]:
        """Read the trimap and its frame, and encode them into the memory every shard reads."""
        trimap_url = video.params.get("trimap", self.trimap)
        index = int(video.params.get("memory_frame", self.memory_frame))
        if not trimap_url:
            raise ModelError("ftpvm: needs a trimap (param 'trimap': image path or URL)")
        trimap = read_trimap(trimap_url, video.storage_options)
        if trimap.shape != (video.height, video.width):
            raise ModelError(
                f"ftpvm: trimap {trimap_url!r} is {trimap.shape[1]}x{trimap.shape[0]}, "
                f"the video is {video.width}x{video.height}"
            )
        if not 0 <= index < video.frame_count:
            raise ModelError(f"ftpvm: memory_frame {index} is outside the video (0..{video.frame_count - 1})")
        from farm.video import read_frames

        frame = next(
            iter(read_frames(video.url, index, index + 1, storage_options=video.storage_options)), None
        )
        if frame is None:
            raise ModelError(f"ftpvm: could not decode memory frame {index} of {video.url}")
        return self.encode_memory(frame, trimap)

    def encode_memory(self, frame: np.ndarray, trimap: np.ndarray) -> dict[str, np.ndarray]:
        """``uint8 [H, W, 3]`` frame + ``uint8 [H, W]`` trimap -> the memory as plain arrays."""
        import torch

        from actors.ftpvm_net import pad_divide_by

        self._need_net()
        h, w = frame.shape[:2]
        if frame.ndim != 3 or frame.shape[2] != 3 or trimap.shape != (h, w):
            raise ModelError(f"ftpvm: memory frame {frame.shape} and trimap {trimap.shape} do not match")
        with torch.inference_mode():
            img = self._to_tensor(frame[None])  # [1, 1, 3, Hp, Wp]
            mask = torch.from_numpy(np.array(trimap, dtype=np.float32)).to(self.device, img.dtype).div(255)
            mask = pad_divide_by(mask[None, None, None], 16)[0]  # [1, 1, 1, Hp, Wp]
            feat16, value = self.net.encode_imgs_to_value(img, mask, self.downsample_ratio)
        return {
            "m_feat16": feat16.float().cpu().numpy(),  # [1, 1, 112, h/16, w/16]
            "m_value": value.float().cpu().numpy(),  # [1, 112, 1, h/16, w/16]
            "frame_size": np.array([h, w], dtype=np.int64),
            "downsample_ratio": np.array(self.downsample_ratio, dtype=np.float64),
        }

    # ------------------------------------------------------------------ per shard

    def _to_tensor(self, frames: np.ndarray) -> Any:
        """``uint8 [T, H, W, 3]`` -> ``[1, T, 3, Hp, Wp]`` in [0, 1], padded to a multiple of 16."""
        import torch

        from actors.ftpvm_net import pad_divide_by

        # a copy: arrays from the object store or a decoder may be read-only
        x = torch.from_numpy(np.array(frames, dtype=np.uint8)).to(self.device)
        x = x.permute(0, 3, 1, 2).to(getattr(torch, self.dtype)).div(255)
        return pad_divide_by(x, 16)[0][None]

    def state_shapes(self, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the handed-off GRU states for frames of this size (batch dimension dropped)."""
        h, w = _pad16(height), _pad16(width)
        if self.downsample_ratio != 1:  # the network resizes (floor) then pads again to 16
            h, w = _pad16(int(h * self.downsample_ratio)), _pad16(int(w * self.downsample_ratio))
        return {k: (c, h // s, w // s) for k, (c, s) in _STATE.items()}

    def render(self, frames: np.ndarray, cond: Any, state: State | None) -> tuple[Outputs, State | None]:
        """Matte ``uint8 [T, H, W, 3]`` against the memory in ``cond``; ``state`` = the GRU states the
        previous shard handed over (``None`` starts cold, as at the memory frame)."""
        import torch

        self._need_net()
        if not cond or "m_value" not in cond:
            raise ModelError("ftpvm: no memory to read (prepare() was not run for this video)")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ModelError(f"ftpvm: frames must be [T, H, W, 3] RGB (got {frames.shape})")
        t, h, w = frames.shape[:3]
        if tuple(cond["frame_size"]) != (h, w) or float(cond["downsample_ratio"]) != self.downsample_ratio:
            raise ModelError(
                f"ftpvm: the memory was encoded for {tuple(cond['frame_size'])} at downsample_ratio "
                f"{float(cond['downsample_ratio'])}, these frames are {(h, w)} at {self.downsample_ratio}"
            )
        check_state(state, self.state_shapes(h, w), self.name)
        if t == 0:
            return {"alpha": np.zeros((0, h, w, 1), dtype=np.float32)}, state

        tdt = getattr(torch, self.dtype)
        alpha = np.empty((t, h, w, 1), dtype=np.float32)
        with torch.inference_mode():
            m_feat16 = torch.from_numpy(np.array(cond["m_feat16"], dtype=np.float32)).to(self.device, tdt)
            m_value = torch.from_numpy(np.array(cond["m_value"], dtype=np.float32)).to(self.device, tdt)
            rec: list[Any] = [None, None]
            if state is not None:
                r = {
                    k: torch.from_numpy(np.array(v, dtype=np.float32))[None].to(self.device, tdt)
                    for k, v in state.items()
                }
                rec = [[r["rec_seg_8"], r["rec_seg_16"]], [r["rec_mat_1"], r["rec_mat_2"]]]
            ph, pw = (_pad16(h) - h) // 2, (_pad16(w) - w) // 2
            for i in range(0, t, self.seq_chunk):
                x = self._to_tensor(frames[i : i + self.seq_chunk])  # [1, t, 3, Hp, Wp]
                _, _, collab, rec = self.net.forward_with_memory(
                    x, m_feat16, m_value, *rec, downsample_ratio=self.downsample_ratio
                )
                out = collab[0, :, 0, ph : ph + h, pw : pw + w].clamp(0, 1)  # [t, H, W]
                alpha[i : i + x.shape[1], :, :, 0] = out.float().cpu().numpy()
            (r8, r16), (r1, r2) = rec
            new_state = {
                k: v[0].float().cpu().numpy()
                for k, v in zip(
                    ("rec_seg_8", "rec_seg_16", "rec_mat_1", "rec_mat_2"), (r8, r16, r1, r2), strict=True
                )
            }
        return {"alpha": alpha}, new_state
