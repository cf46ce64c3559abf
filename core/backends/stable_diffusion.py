"""``stable-diffusion``: any diffusers ``StableDiffusionPipeline``, from a local folder or a hub id.

Text-conditional latent diffusion with classifier-free guidance. The pipeline's own scheduler
config (PNDM, DDIM, Euler...) is turned into DDIM settings for the shared DDIM code, and the
model's output is always returned as an ε prediction (``v_prediction`` and ``sample`` models are
converted), so DDIM, inversion and the posterior-mean Jacobian work unchanged. fp16 on CUDA,
fp32 on CPU by default. The safety checker is never loaded: images are produced by the shared
DDIM code and this backend's ``decode``, not by the pipeline's ``__call__``.

Needs the ``sd`` extra (transformers).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from shallowmark.core.backends.base import Backend
from shallowmark.errors import InvalidParameterError, InvalidShapeError, MissingDependencyError, check_int

# The parts of a pipeline folder this backend uses (``model_index.json`` names them too).
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class SDCondition:
    """Prompt conditioning for :class:`StableDiffusion`: text embeddings (batch, tokens, dim) for
    the prompts and for the unconditional (negative) prompts, and the guidance scale.

    A batch of 1 is broadcast over any latent batch.
    """

    cond_emb: torch.Tensor
    uncond_emb: torch.Tensor
    guidance_scale: float

    @property
    def batch(self) -> int:
        return int(self.cond_emb.shape[0])


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InvalidParameterError(f"dtype must be a torch dtype or one of {', '.join(sorted(_DTYPES))}; got {dtype!r}")


def _check_pipeline_folder(path: Path) -> None:
    """Raise a clear error unless ``path`` looks like a diffusers Stable Diffusion pipeline folder."""
    if not path.is_dir():
        raise InvalidParameterError(
            f"{path} is a file, not a diffusers pipeline folder; the stable-diffusion backend loads a folder "
            f"written by save_pretrained (model_index.json, {', '.join(REQUIRED_COMPONENTS)}) or a hub id")
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidParameterError(
            f"{path} is not a diffusers Stable Diffusion pipeline folder: model_index.json is missing "
            f"(expected model_index.json and the subfolders {', '.join(REQUIRED_COMPONENTS)})")
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise InvalidParameterError(f"{path}: model_index.json cannot be read ({e})") from e
    missing = [c for c in REQUIRED_COMPONENTS
               if not (path / c).is_dir() or not isinstance(entries.get(c), list) or entries[c][0] is None]
    if missing:
        raise InvalidParameterError(
            f"{path} is not a diffusers Stable Diffusion pipeline folder: missing {', '.join(missing)} "
            f"(needs model_index.json entries and subfolders for {', '.join(REQUIRED_COMPONENTS)})")


def ddim_config(scheduler_config) -> dict:
    """DDIM settings from any diffusers scheduler config of a Stable Diffusion pipeline.

    Keeps the training schedule (betas, timesteps, offset, spacing); keys DDIM does not know
    (PNDM's ``skip_prk_steps``...) are dropped, and ``clip_sample`` defaults to False as in every SD
    pipeline (a PNDM config does not state it and DDIM's own default would clip latents).
    """
    from diffusers import DDIMScheduler

    src = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in src.items() if k in accepted}
    cfg.setdefault("clip_sample", False)
    cfg.setdefault("set_alpha_to_one", False)
    return {k: v for k, v in dict(DDIMScheduler.from_config(cfg).config).items() if not k.startswith("_")}


class StableDiffusion(Backend):
    """Any diffusers Stable Diffusion pipeline (local folder or hub id), with classifier-free guidance."""

    name = "stable-diffusion"
    conditional = True

    def __init__(self, model: str | Path | None = None, device: str | torch.device = "cpu", dtype=None,
                 guidance_scale: float = 7.5, pipeline=None, **load_options):
        """Load ``model`` (a pipeline folder or hub id) or wrap an already-built ``pipeline``.

        ``dtype`` defaults to float16 on CUDA and float32 elsewhere; a given ``pipeline`` is moved
        to ``device``/``dtype``. ``load_options`` go to ``StableDiffusionPipeline.from_pretrained``
        (e.g. ``variant="fp16"``, ``revision=...``, ``local_files_only=True``).
        """
        try:
            from diffusers import StableDiffusionPipeline
            import transformers  # noqa: F401  (the text encoder and tokenizer)
        except ImportError as e:  # pragma: no cover - depends on the installed extras
            raise MissingDependencyError("the stable-diffusion backend", "sd", e) from e

        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        g = guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise InvalidParameterError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        self.guidance_scale = float(g)

        if pipeline is None:
            if model is None:
                raise InvalidParameterError("stable-diffusion needs model= (a pipeline folder or hub id) or pipeline=")
            pipeline = self._load(StableDiffusionPipeline, model, load_options)
            self.model = str(model)
        else:
            missing = [c for c in REQUIRED_COMPONENTS if getattr(pipeline, c, None) is None]
            if missing:
                raise InvalidParameterError(
                    f"pipeline= must be a diffusers StableDiffusionPipeline; {type(pipeline).__name__} lacks "
                    f"{', '.join(missing)}")
            self.model = str(model) if model is not None else type(pipeline).__name__
        if getattr(pipeline, "safety_checker", None) is not None:
            pipeline.register_modules(safety_checker=None)
        self.pipeline = pipeline
        self.unet, self.vae = pipeline.unet, pipeline.vae
        self.text_encoder, self.tokenizer = pipeline.text_encoder, pipeline.tokenizer
        for m in (self.unet, self.vae, self.text_encoder):
            if m.dtype != self.dtype:  # cast only when needed: diffusers warns on every dtype cast
                m.to(dtype=self.dtype)
            m.to(self.device).eval().requires_grad_(False)

        self._setup_shapes()
        self._setup_schedule(pipeline.scheduler.config)
        self._init_vae_latents()
        self._empty_emb: torch.Tensor | None = None

    # -- loading ----------------------------------------------------------------------------------
    def _load(self, pipeline_cls, model, load_options):
        path = Path(model).expanduser()
        if path.exists():
            _check_pipeline_folder(path)
            where = f"folder {path}"
            source = str(path)
        elif isinstance(model, str) and _HUB_ID.match(model):
            where, source = f"hub id {model!r} (no local folder of that name)", model
        else:
            raise InvalidParameterError(
                f"stable-diffusion model {str(model)!r} is neither an existing pipeline folder nor a hub id")
        options = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        options.update(load_options)
        # newer diffusers name the keyword ``dtype`` and deprecate ``torch_dtype``
        from diffusers.utils import deprecation_utils

        dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        options.setdefault(dtype_key, self.dtype)
        try:
            return pipeline_cls.from_pretrained(source, **options)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InvalidParameterError(f"cannot load a Stable Diffusion pipeline from {where}: {e}") from e

    def _setup_shapes(self) -> None:
        uc, vc = self.unet.config, self.vae.config
        size = uc.sample_size
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise InvalidParameterError(f"{self.model}: only square latents are supported; unet sample_size is {size}")
            size = size[0]
        if int(uc.in_channels) != int(vc.latent_channels):
            raise InvalidParameterError(
                f"{self.model}: the unet takes {uc.in_channels} input channels but the vae makes "
                f"{vc.latent_channels}-channel latents (an inpainting or depth model?); a text-to-image "
                f"Stable Diffusion pipeline is needed")
        if getattr(uc, "addition_embed_type", None) is not None:
            raise InvalidParameterError(
                f"{self.model}: the unet needs added conditioning ({uc.addition_embed_type}, as SDXL does); "
                f"only Stable Diffusion 1.x/2.x pipelines are supported")
        self.latent_shape = (int(uc.in_channels), int(size), int(size))
        self.vae_scale_factor = 2 ** (len(vc.block_out_channels) - 1)
        self.image_size = int(size) * self.vae_scale_factor

    def _setup_schedule(self, config) -> None:
        from diffusers import DDIMScheduler

        cfg = ddim_config(config)
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InvalidParameterError(f"{self.model}: unsupported prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = DDIMScheduler.from_config(cfg).alphas_cumprod.double().cpu()
        # eps() always returns ε, so that is what the shared DDIM code is told.
        self.scheduler_config = {**cfg, "prediction_type": "epsilon"}

    # -- conditioning -----------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        emb, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return emb.to(self.device, self.dtype)

    def _prompt_list(self, what: str, prompts, batch: int) -> list[str]:
        if prompts is None:
            return [""] * batch
        if isinstance(prompts, str):
            return [prompts] * batch
        prompts = list(prompts)
        if len(prompts) != batch:
            raise InvalidParameterError(f"{len(prompts)} {what} given for a batch of {batch}; give one per sample "
                                        f"(or a single string for all)")
        bad = [p for p in prompts if p is not None and not isinstance(p, str)]
        if bad:
            raise InvalidParameterError(f"{what} must be strings; got {type(bad[0]).__name__}")
        return ["" if p is None else p for p in prompts]

    def encode_prompt(self, prompts: Sequence[str | None] | str | None, batch: int,
                      negative_prompts: Sequence[str | None] | str | None = None,
                      guidance_scale: float | None = None) -> SDCondition:
        """Text conditioning for ``batch`` samples: one prompt per sample (a single string or
        ``None`` — the empty prompt — applies to all). ``negative_prompts`` replace the empty
        unconditional prompt of classifier-free guidance; ``guidance_scale`` overrides the backend's."""
        check_int("batch", batch, 1)
        cond = self._prompt_list("prompts", prompts, batch)
        uncond = self._prompt_list("negative prompts", negative_prompts, batch)
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise InvalidParameterError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        emb = self._embed(cond + uncond)
        return SDCondition(emb[:batch], emb[batch:], float(g))

    def _empty(self, batch: int) -> torch.Tensor:
        if self._empty_emb is None:
            self._empty_emb = self._embed([""])
        return self._empty_emb.expand(batch, -1, -1)

    # -- model ------------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """ε(x_t, t) with classifier-free guidance: one batched UNet call on [uncond; cond], or a
        single call when ``cond`` is ``None`` (empty prompt), a raw embedding tensor, or has
        guidance scale 1. Differentiable in ``x_t``."""
        self.check_latents(x_t)
        b = x_t.shape[0]
        x = x_t.to(self.device, self.dtype)
        tt = torch.as_tensor(t, device=self.device)
        tt = tt.expand(b) if tt.dim() == 0 else tt.flatten()
        if tt.shape[0] != b:
            raise InvalidShapeError(f"{self.name}: {tt.shape[0]} timesteps for a batch of {b}")

        if cond is None:
            out = self._unet(x, tt, self._empty(b))
        elif isinstance(cond, torch.Tensor):
            out = self._unet(x, tt, self._batched(cond, b, "prompt embedding"))
        elif isinstance(cond, SDCondition):
            c = self._batched(cond.cond_emb, b, "conditioning")
            if cond.guidance_scale == 1.0:
                out = self._unet(x, tt, c)
            else:
                u = self._batched(cond.uncond_emb, b, "unconditional embedding")
                out_u, out_c = self._unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([u, c])).chunk(2)
                out = out_u + cond.guidance_scale * (out_c - out_u)
        else:
            raise InvalidParameterError(
                f"{self.name}: cond must be None, an SDCondition from encode_prompt, or a prompt-embedding "
                f"tensor; got {type(cond).__name__}")
        return self._to_eps(out.to(x_t.dtype), x_t, tt)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=emb).sample

    def _batched(self, emb: torch.Tensor, b: int, what: str) -> torch.Tensor:
        if emb.dim() != 3 or emb.shape[0] not in (1, b):
            raise InvalidShapeError(f"{self.name}: {what} of shape {tuple(emb.shape)} does not fit a batch of {b} "
                                    f"(expected (1 or {b}, tokens, dim))")
        return emb.to(self.device, self.dtype).expand(b, -1, -1)

    def _to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod[t.long().cpu()].to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)
        x = x_t.to(out.device)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x
        return (x - a.sqrt() * out) / (1 - a).sqrt()  # "sample": the model predicts x_0

    def parameter_count(self) -> int:
        return sum(p.numel() for m in (self.unet, self.vae, self.text_encoder) for p in m.parameters())
