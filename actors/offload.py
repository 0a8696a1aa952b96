"""Where a diffusion adapter's components live and when they move: written once, for every adapter.

Modes (diffusers' names for the same ideas):

- ``full``: every component on the device (fastest, most memory);
- ``model_offload``: components wait on the CPU and each goes to the device only while it runs
  (``enable_model_cpu_offload``): one component's weights resident at a time;
- ``sequential``: each submodule's own weights go to the device for its forward and back after
  (``enable_sequential_cpu_offload``): one layer resident at a time, slowest;
- ``group_offload``: diffusers' block-level group offload (``enable_group_offload``) for components that
  support it (``ModelMixin``); others behave as ``model_offload``.

Older spellings stay valid (``gpu`` is ``full``). On a CPU device every mode is ``full``: nothing moves.
torch is imported only when a mode needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from actors.base import ModelError

MODES = ("full", "model_offload", "sequential", "group_offload")
ALIASES = {"gpu": "full"}  # GVM's name before the modes were shared


def memory_mode(value: Any, model: str, allowed: tuple[str, ...] = MODES) -> str:
    """The canonical mode for a spec's ``memory`` value, or a one-line ModelError naming the choices."""
    mode = ALIASES.get(value, value) if isinstance(value, str) else value
    if mode not in allowed:
        names = ", ".join([*allowed, *(a for a, m in ALIASES.items() if m in allowed)])
        raise ModelError(f"{model}: memory must be one of {names} (got {value!r})")
    return mode


class Offload:
    """Places ``components()`` for ``mode`` on ``device`` and moves them as the mode says.

    ``components`` is called (not stored) so an adapter may swap a component after loading."""

    def __init__(self, mode: str, device: Any, components: Callable[[], list[Any]]) -> None:
        self.mode, self.device, self.components = mode, device, components
        self.moves = 0  # component or submodule moves done (tests read it: an offload mode must move)

    @property
    def on_cpu(self) -> bool:
        return str(self.device) == "cpu"

    @property
    def effective(self) -> str:
        return "full" if self.on_cpu else self.mode

    @property
    def execution_device(self) -> Any:
        """Where a call's inputs go: the device, but the CPU under ``sequential`` (the hooks move them)."""
        return "cpu" if self.effective == "sequential" else self.device

    def place(self) -> None:
        """Put every component where the mode keeps it between calls."""
        mode = self.effective
        for m in self.components():
            if mode == "group_offload" and hasattr(m, "enable_group_offload"):
                m.enable_group_offload(onload_device=self.device, offload_type="block_level", num_blocks_per_group=1)
            else:
                m.to(self.device if mode == "full" else "cpu")
            if mode == "sequential":
                self._attach_sequential(m)

    @contextmanager
    def use(self, module: Any) -> Iterator[Any]:
        """``module`` on the device for the duration (model offload), else as placed."""
        grouped = self.effective == "group_offload" and hasattr(module, "enable_group_offload")
        if self.effective not in ("model_offload", "group_offload") or grouped:
            yield module
            return
        module.to(self.device)
        self.moves += 1
        try:
            yield module
        finally:
            module.to("cpu")
            self.moves += 1
            if str(self.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # give the component's blocks back before the next one comes in

    def resident_bytes(self) -> int:
        """Bytes of parameters and buffers on the accelerator now (each shared tensor counted once)."""
        seen: set[int] = set()
        total = 0
        for m in self.components():
            for t in (*m.parameters(), *m.buffers()):
                if t.device.type != "cpu" and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total

    def _attach_sequential(self, root: Any) -> None:
        import torch

        dev = torch.device(self.device)

        def move(mod: Any, to: Any) -> None:
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(to)
            for name, b in mod.named_buffers(recurse=False):
                mod._buffers[name] = b.to(to)
            self.moves += 1

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
