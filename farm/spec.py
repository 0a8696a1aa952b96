"""The job spec: a YAML file parsed with ``safe_load`` into strict, typed pydantic models.

Every error names the file, the line and the field path, e.g.
``jobs/x.yaml:12 window.overlap: must be smaller than window.frames (16 >= 8)``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.digest import short_sha256
from farm.plan import overlap_problem, resolve_window

CHANNELS = ("alpha", "fgr", "comp", "rgb", "rgba")
FORMAT_EXT = {"mp4": "mp4", "mov": "mov", "png": ""}
PLACEHOLDERS = {"job", "stem", "channel", "ext"}


class SpecError(ValueError):
    """A job file that cannot run; ``str()`` is the one-line message users see."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field("keyer", description="Model plugin name (`farm models` lists them).")
    weights: str | None = Field(
        None, description="Weights reference: local path, hf://org/repo/file, s3://..., https://...#sha256=..."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Model parameters, passed to the plugin.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor has a GPU.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from actors import model_names

        if name not in model_names():
            raise ValueError(f"unknown model {name!r} (known: {', '.join(model_names())})")
        return name

    @model_validator(mode="after")
    def _model_params(self) -> ModelSpec:
        """The plugin's own check of its params (light: model classes import no torch)."""
        from actors import load_model_class
        from actors.base import ModelError

        try:
            cls = load_model_class(self.name)
        except ImportError:  # a plugin that cannot import reports it when its actors load
            return self
        try:
            cls.validate_params(dict(self.params))
        except ModelError as e:
            raise ValueError(f"params: {e}") from None
        return self


class WindowSpec(_Strict):
    frames: int | None = Field(None, ge=1, description="Frames per shard (default: the model's).")
    overlap: int | None = Field(None, ge=0, description="Frames shared by adjacent shards, blended.")
    state: Literal["auto", "none", "handoff", "preroll"] = Field(
        "auto", description="How recurrent state crosses shards; auto = the model's default."
    )
    preroll: int = Field(0, ge=0, description="With state=preroll: frames run before each shard, discarded.")
    blend: Literal["linear", "cosine"] = Field("linear", description="Ramp used across overlaps.")

    @model_validator(mode="after")
    def _overlap_fits(self) -> WindowSpec:
        if self.frames is not None and self.overlap is not None:
            problem = overlap_problem(self.frames, self.overlap)
            if problem:
                raise ValueError(f"overlap: {problem}")
        if self.state == "preroll" and self.preroll == 0:
            raise ValueError("preroll: state=preroll needs preroll > 0 frames")
        return self


class OutputSpec(_Strict):
    uri: str = Field(
        "out/{job}/{stem}_{channel}.{ext}",
        description="Template with {job}, {stem}, {channel}, {ext}; png writes a folder of frames.",
    )
    channels: list[Literal["alpha", "fgr", "comp", "rgb", "rgba"]] = Field(
        default_factory=lambda: ["alpha"], min_length=1
    )
    format: Literal["mp4", "mov", "png"] = Field("mp4", description="mp4: H.264; mov: ProRes 4444; png: sequence.")
    quality: int = Field(16, ge=0, le=51, description="x264 CRF (lower is better); ignored by mov and png.")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"] = (
        Field("veryfast", description="x264 preset: faster ones use less CPU per frame for larger files at the same "
              "CRF; farm's default takes about a third of x264's default (medium) CPU per frame for colour, for files "
              "about 7% larger (the README's Performance section); ignored by mov and png.")
    )
    background: tuple[float, float, float] | str = Field(
        (0.0, 0.0, 0.0),
        description="Under `comp`: RGB in [0,1], or an image or video (a clean plate) by path/URL, resized to "
        "the frame; a manifest's `background` column sets it per video.",
    )
    audio: bool = Field(True, description="Carry the source audio into colour outputs (fgr, comp, rgb).")

    @field_validator("background")
    @classmethod
    def _background(cls, bg: tuple[float, float, float] | str) -> tuple[float, float, float] | str:
        if isinstance(bg, str):
            if not bg.strip():
                raise ValueError("must be an RGB triple in [0, 1] or an image/video path or URL")
            return bg
        if not all(0.0 <= c <= 1.0 for c in bg):
            raise ValueError(f"each of R, G, B must be in [0, 1], got {list(bg)}")
        return bg

    @field_validator("uri")
    @classmethod
    def _template(cls, uri: str) -> str:
        names = set(re.findall(r"{(\w*)}", uri))
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (allowed: job, stem, channel, ext)")
        if "stem" not in names:
            raise ValueError("must contain {stem} so that each input video gets its own output")
        return uri

    @model_validator(mode="after")
    def _channel_in_uri(self) -> OutputSpec:
        if len(self.channels) > 1 and "{channel}" not in self.uri:
            raise ValueError("uri: must contain {channel} when more than one channel is written")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError("channels: listed twice")
        if "rgba" in self.channels and self.format == "mp4":
            raise ValueError("channels: rgba needs format mov or png (H.264 has no alpha)")
        return self


class ResourcesSpec(_Strict):
    actors: int = Field(1, ge=1, description="Model actors in the pool (one model load each).")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    gpu_memory_gb: float | None = Field(None, gt=0, description="Per-actor GPU memory budget, checked at load.")
    custom: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {matting_gpu: 1} (see cluster.yaml)."
    )


class LimitsSpec(_Strict):
    max_frames: int | None = Field(None, ge=1, description="Refuse input videos with more frames than this.")
    max_pixels: int | None = Field(None, ge=1, description="Refuse input videos with more pixels per frame (w*h).")


class SchedulerSpec(_Strict):
    speculative: bool | None = Field(
        None,
        description="Copy a straggling shard to an idle actor at a video's tail; the first result wins. "
        "null: on for stateless models, off for handoff chains (always off there).",
    )
    heartbeat_s: float | None = Field(
        30.0, gt=0, description="An actor that does not answer a ping within this is hung: killed and replaced."
    )
    stall_s: float = Field(
        300.0,
        gt=0,
        description="A busy actor whose render makes no progress (no chunk finished) for this long, and for 4x "
        "the longest chunk seen in the job, is hung.",
    )
    blocklist_after: int = Field(3, ge=1, description="Failures of one actor in a job after which it gets no shards.")
    preemption: Literal["drain", "ignore"] = Field(
        "drain",
        description="A node's drain notice (a spot node about to be preempted): 'drain' sends no more work there, "
        "replaces its actors elsewhere and copies its shards in flight that would not finish by the deadline; "
        "'ignore' loses the node's work when it goes.",
    )
    shards_per_actor: int = Field(
        2, ge=1, le=4, description="Shards an actor holds at once. With 2, the next shard decodes while the "
        "current one renders and its model calls start as soon as the current one's last call ends, while that "
        "one's encoders and uploads finish (the accelerator never waits between shards). 1: one at a time.",
    )
    drain_min_deadline_s: float = Field(
        10.0, ge=0, description="Under this much notice a shard in flight on a draining node is copied at once, "
        "never left to finish in place.",
    )


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Job name, used in keys.")
    inputs: list[str] = Field(min_length=1, description="Video URLs or globs (local or fsspec).")
    model: ModelSpec = Field(default_factory=ModelSpec)
    window: WindowSpec = Field(default_factory=WindowSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    retries: int = Field(2, ge=0, le=20, description="Extra attempts per shard, each on another actor if any.")
    max_failed_shards: int | None = Field(None, ge=0, description="Stop the job after this many failed shards.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Failure and straggler handling.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (credentials).")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Inputs over these are refused at probe.")

    @field_validator("inputs")
    @classmethod
    def _inputs_not_blank(cls, inputs: list[str]) -> list[str]:
        for i, url in enumerate(inputs):
            if not url.strip():
                raise ValueError(f"[{i}]: empty input")
        return inputs

    @model_validator(mode="after")
    def _window_tiles_videos(self) -> JobSpec:
        """The window as a run resolves it (the model's defaults filled in) must tile a video: a spec that
        validates must render."""
        from actors import load_model_class

        try:
            defaults = load_model_class(self.model.name).window
        except Exception:  # an unknown model: the model field reported it already
            return self
        w = self.window
        _, frames, overlap, _ = resolve_window(w, defaults)
        problem = overlap_problem(frames, overlap)
        if problem and (w.frames is None or w.overlap is None):  # both given: the window's own check ran
            if w.overlap is not None:
                raise ValueError(f"window.overlap: {problem} (window.frames is {self.model.name}'s {frames})")
            raise ValueError(
                f"window.frames: {frames} is too short for {self.model.name}'s overlap of {overlap}: the overlap "
                f"{problem}"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of what determines the output (not credentials): the job id's suffix."""
        runtime_only = {"storage_options", "resources", "retries", "max_failed_shards", "limits", "scheduler"}
        data = self.model_dump(mode="json", exclude=runtime_only)
        return short_sha256(json.dumps(data, sort_keys=True), 10)

    @property
    def job_id(self) -> str:
        return f"{self.name}-{self.fingerprint()}"

    def public_dict(self) -> dict[str, Any]:
        """The spec as JSON for ledgers and logs: storage options are never written."""
        data = self.model_dump(mode="json")
        data["storage_options"] = {k: "***" for k in self.storage_options}
        return data


# ---- loading with line numbers ---------------------------------------------------------------


def _node_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the deepest YAML node along a pydantic error location."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _error_message(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    msg = err["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required"
    elif err["type"] == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    # A validator may name a sub-field first ("overlap: must ..."): move it into the path.
    m = re.match(r"^([a-z_]+(?:\.[a-z_]+)*(?:\[\d+\])?): (.*)$", msg)
    if m:
        loc = loc + tuple(m.group(1).split("."))
        msg = m.group(2)
    return loc, msg


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int) or (isinstance(p, str) and p.startswith("[")):
            out += f"[{p}]" if isinstance(p, int) else p
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def parse_spec(text: str, source: str = "<job>") -> JobSpec:
    """Parse job YAML text; raise SpecError with ``source:line field: reason`` on any problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        # An unclosed bracket is reported at the end of the file; where it opened is more useful.
        mark = e.context_mark or e.problem_mark
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{source}{line}: invalid YAML ({e.problem or e.context})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}:1: a job file must be a mapping of fields (name, inputs, model, ...)")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc, msg = _error_message(first)
        line = _node_line(root, tuple(p for p in loc if not (isinstance(p, str) and p.startswith("["))))
        where = f"{source}:{line}" if line else source
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise SpecError(f"{where} {_dotted(loc)}: {msg}{more}") from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a job file from a local path."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read job file ({e.__class__.__name__})") from None
    return parse_spec(text, source=str(path))


def absolute_local_paths(spec: JobSpec) -> JobSpec:
    """Local paths are relative to the submitting shell; actors run elsewhere, so make them absolute.

    The job id is computed after this, so ``farm validate``, ``plan``, ``status`` and ``submit`` agree."""

    def fix(url: str) -> str:
        return url if "://" in url else os.path.abspath(url)

    update: dict[str, Any] = {"uri": fix(spec.output.uri)}
    if isinstance(spec.output.background, str):
        update["background"] = fix(spec.output.background)
    output = spec.output.model_copy(update=update)
    return spec.model_copy(update={"inputs": [fix(u) for u in spec.inputs], "output": output})
