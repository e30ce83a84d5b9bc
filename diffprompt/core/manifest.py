"""The artifact manifest: what an exported directory holds, typed, and its validation at load time.

`manifest.json` records versions, the graphs with their input/output names, shapes and dtypes,
the fixed DDIM step count and its schedule table, the prompt depth/length, the image
preprocessing (`ImageSpec`), a sha256 per file, and, when the pipeline was calibrated, the
no-match calibrator (`no_match`, diffprompt.core.no_match). `Manifest` is its one typed form: the
exporter builds one and writes `to_dict()`, the runtime, the service and the Triton writer
read `Manifest.from_dict`. `validate_artifact` checks every file against it; any missing,
truncated or altered file is an `ArtifactError` naming the file. No torch here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffprompt.core.ddim import DDIMStep, steps_from_table
from diffprompt.core.errors import UserError, read_json_object
from diffprompt.core.image_spec import ImageSpec
from diffprompt.core.no_match import NoMatchCalibration
from diffprompt.core.prompt_solver import PromptSampler

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class ArtifactError(UserError):
    """An artifact directory is missing, incomplete, altered, or used against its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


# -- the typed manifest ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: shape with "batch" for the batch axis, numpy dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> TensorInfo:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphInfo:
    file: str  # ONNX file name inside the artifact directory
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @classmethod
    def from_dict(cls, d: dict) -> GraphInfo:
        return cls(d["file"], tuple(TensorInfo.from_dict(i) for i in d["inputs"]),
                   tuple(TensorInfo.from_dict(o) for o in d["outputs"]))

    def to_dict(self) -> dict:
        return {"file": self.file, "inputs": [i.to_dict() for i in self.inputs],
                "outputs": [o.to_dict() for o in self.outputs]}

    @property
    def input_shapes(self) -> dict[str, tuple[int | str, ...]]:
        return {i.name: i.shape for i in self.inputs}


@dataclass(frozen=True)
class TokenizerInfo:
    file: str  # tokenizer.json inside the artifact directory
    max_length: int  # ids per query (padded / truncated)


@dataclass(frozen=True)
class SamplerInfo:
    """What the DDIM loop needs (Diff-Prompt artifacts only): one fixed step count, its schedule."""

    conditioning: str  # "pooled" (paper) or "tokens"
    denoiser_conditions: tuple[str, ...]  # condition_encoder outputs the denoiser takes, in order
    latent_shape: tuple[int, int, int]  # (C, h, w) of the mask latent
    mask_size: int  # side m of the decoded masks
    prediction_type: str  # "epsilon" | "sample" | "v_prediction"
    clip_sample_range: float | None  # x0 clipped to [-r, r], None = no clipping
    schedule: tuple[DDIMStep, ...]  # one row per denoiser call
    kept_outputs: tuple[int, ...]  # DDIM outputs handed to the prompt builder, shallowest layer first
    prompt_depth: dict[str, int]  # {"vision": dv, "text": dt} prompted layers per tower
    prompt_length: int  # prompt tokens per prompted layer


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed. `extra` keeps fields this version does not know (written back as they were)."""

    name: str
    model_version: str  # "{name}-{12 hex of the files' hash}"
    method: str  # "diffprompt", a baseline's name, or "foundation"
    image: ImageSpec
    tokenizer: TokenizerInfo
    ddim_steps: int  # 0 for artifacts without a sampler
    graphs: dict[str, GraphInfo]
    files: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes"}
    num_patches: int | None = None
    sampler: SamplerInfo | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    dtype: str = "float32"
    export_max_abs_diff: dict[str, float] = field(default_factory=dict)
    no_match: NoMatchCalibration | None = None  # P(no match) from the outputs (diffprompt.core.no_match)
    # fusion: each box's logit + pointer_weight x the pointer's log-probability of its patch relative to
    # uniform (the condition encoder's last `maps` channel); 0 = the grounding logits alone
    pointer_weight: float = 0.0
    # Prompt Diffusion artifacts: the solver loop over the prompt_denoiser graph (diffprompt.core.prompt_solver)
    prompt_sampler: PromptSampler | None = None
    # "fused": the foundation's vision attention is onnxruntime's com.microsoft::MultiHeadAttention
    # (model_export/fused_attention.py), "plain": standard ONNX operators only
    attention: str = "plain"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def makes_masks(self) -> bool:
        """Diff-Prompt artifacts generate a mask prompt; foundation and baseline artifacts do not."""
        return self.sampler is not None

    # -- JSON ------------------------------------------------------------------------------------

    _SAMPLER_KEYS = ("conditioning", "denoiser_conditions", "latent_shape", "mask_size", "prediction_type",
                     "clip_sample_range", "schedule", "kept_outputs", "prompt_depth", "prompt_length")
    _KNOWN = {"format_version", "name", "created", "versions", "method", "dtype", "image", "tokenizer",
              "ddim_steps", "graphs", "export_max_abs_diff", "files", "model_version", "no_match", "pointer_weight",
              "prompt_sampler", "attention", *_SAMPLER_KEYS}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_FILE) -> Manifest:
        """Parse a manifest dict; ArtifactError naming `where` and the field if it is malformed."""
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        for key in ("files", "graphs", "ddim_steps", "image", "tokenizer"):
            if key not in d:
                raise ArtifactError(f"{where}: no {key!r} entry")
        try:
            sampler = None
            if "denoiser" in d["graphs"]:
                sampler = SamplerInfo(
                    d["conditioning"], tuple(d["denoiser_conditions"]), tuple(int(v) for v in d["latent_shape"]),
                    int(d["mask_size"]), d["prediction_type"],
                    None if d["clip_sample_range"] is None else float(d["clip_sample_range"]),
                    tuple(steps_from_table(d["schedule"])), tuple(int(i) for i in d["kept_outputs"]),
                    dict(d["prompt_depth"]), int(d["prompt_length"]))
                if len(sampler.schedule) != int(d["ddim_steps"]):
                    raise ArtifactError(f"{where}: schedule has {len(sampler.schedule)} rows for "
                                        f"{d['ddim_steps']} steps")
            prompt_sampler = None
            if "prompt_denoiser" in d["graphs"]:
                ps = d["prompt_sampler"]
                prompt_sampler = PromptSampler(
                    ps["solver"], int(ps["num_features"]), tuple(int(t) for t in ps["timesteps"]),
                    tuple(float(v) for v in ps.get("sigmas", ())), tuple(steps_from_table(ps.get("ddim", []))))
                if prompt_sampler.steps != int(d["ddim_steps"]):
                    raise ArtifactError(f"{where}: prompt_sampler has {prompt_sampler.steps} steps, the artifact "
                                        f"runs {d['ddim_steps']}")
            no_match = NoMatchCalibration.from_dict(d["no_match"]) if d.get("no_match") is not None else None
            if no_match is not None:
                computed = {"scores", "boxes", "attention_mask", *(["mask_logits"] if sampler else []),
                            *(o["name"] for o in d["graphs"].get("condition_encoder", {}).get("outputs", []))}
                if no_match.needs - computed:
                    raise ArtifactError(f"{where}: the no_match calibration reads {sorted(no_match.needs - computed)}, "
                                        "which this artifact does not compute")
            pointer_weight = float(d.get("pointer_weight", 0.0))
            if not 0 <= pointer_weight < float("inf"):
                raise ArtifactError(f"{where}: pointer_weight must be a finite number >= 0, got {pointer_weight}")
            if pointer_weight and "maps" not in (sampler.denoiser_conditions if sampler else ()):
                raise ArtifactError(f"{where}: pointer_weight needs a condition encoder with the pointer's `maps`")
            if no_match is not None and no_match.ddim_steps != int(d["ddim_steps"]):
                raise ArtifactError(f"{where}: the no_match calibration was fitted at {no_match.ddim_steps} DDIM "
                                    f"steps, the artifact runs {d['ddim_steps']}")
            return cls(
                name=d.get("name", ""), model_version=d.get("model_version", "unknown"),
                method=d.get("method", ""), image=ImageSpec.from_dict(d["image"]),
                tokenizer=TokenizerInfo(d["tokenizer"]["file"], int(d["tokenizer"]["max_length"])),
                ddim_steps=int(d["ddim_steps"]),
                graphs={k: GraphInfo.from_dict(g) for k, g in d["graphs"].items()},
                files=dict(d["files"]), num_patches=d["image"].get("num_patches"), sampler=sampler,
                created=d.get("created", ""), versions=dict(d.get("versions", {})), dtype=d.get("dtype", "float32"),
                export_max_abs_diff=dict(d.get("export_max_abs_diff", {})), no_match=no_match,
                pointer_weight=pointer_weight, prompt_sampler=prompt_sampler,
                attention=str(d.get("attention", "plain")),
                extra={k: v for k, v in d.items() if k not in cls._KNOWN})
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed entry ({type(e).__name__}: {e})") from e

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, keys in the order the exporter has always written them."""
        image = self.image.to_dict()
        if self.num_patches is not None:
            image["num_patches"] = self.num_patches
        d: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "name": self.name, "created": self.created, "versions": self.versions,
            "method": self.method, "dtype": self.dtype, "image": image,
            "tokenizer": {"file": self.tokenizer.file, "max_length": self.tokenizer.max_length},
            "ddim_steps": self.ddim_steps, "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "export_max_abs_diff": self.export_max_abs_diff,
        }
        if self.sampler is not None:
            s = self.sampler
            d.update({
                "conditioning": s.conditioning, "denoiser_conditions": list(s.denoiser_conditions),
                "latent_shape": list(s.latent_shape), "mask_size": s.mask_size,
                "prediction_type": s.prediction_type, "clip_sample_range": s.clip_sample_range,
                "schedule": [{"timestep": r.timestep, "alpha_prod_t": r.alpha_prod_t,
                              "alpha_prod_prev": r.alpha_prod_prev} for r in s.schedule],
                "kept_outputs": list(s.kept_outputs), "prompt_depth": dict(s.prompt_depth),
                "prompt_length": s.prompt_length,
            })
        if self.prompt_sampler is not None:
            ps = self.prompt_sampler
            d["prompt_sampler"] = {
                "solver": ps.solver, "num_features": ps.num_features, "timesteps": list(ps.timesteps),
                "sigmas": list(ps.sigmas), "ddim": [{"timestep": r.timestep, "alpha_prod_t": r.alpha_prod_t,
                                                     "alpha_prod_prev": r.alpha_prod_prev} for r in ps.ddim]}
        if self.pointer_weight:
            d["pointer_weight"] = self.pointer_weight
        if self.attention != "plain":
            d["attention"] = self.attention
        if self.no_match is not None:
            d["no_match"] = self.no_match.to_dict()
        d["files"] = self.files
        d["model_version"] = self.model_version
        d.update(self.extra)
        return d

    def check_steps(self, steps: int | None) -> int:
        """The artifact's step count; asking for another one is an error (one artifact per count)."""
        if steps is not None and int(steps) != self.ddim_steps:
            raise ArtifactError(f"this artifact was exported for {self.ddim_steps} DDIM steps, not {steps}: "
                                f"export another one with `diffprompt export --steps {steps}`")
        return self.ddim_steps


# -- reading and validating a directory ------------------------------------------------------------


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: artifact directory does not exist")
    return Manifest.from_dict(read_json_object(path, ArtifactError, "not an exported artifact directory?"), str(path))


def validate_artifact(directory: str | Path, check_hashes: bool = True) -> Manifest:
    """The manifest, after checking every listed file exists with its recorded size and sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, entry in manifest.files.items():
        path = directory / name
        if not path.exists():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced?)")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from {MANIFEST_FILE} (file altered or corrupt)")
    for graph in manifest.graphs.values():
        if graph.file not in manifest.files:
            raise ArtifactError(f"{directory / MANIFEST_FILE}: graph file {graph.file} has no hash entry")
    return manifest

