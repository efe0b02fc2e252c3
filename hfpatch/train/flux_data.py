"""Flux training data from local ``.safetensors`` files: one precomputed sample each, as ``diffusion.Latent``s.

The keys are what diffusers' FluxPipeline computes (so no VAE or text encoder runs here):

- ``latents``: VAE latents already shifted and scaled (``(x - shift_factor) * scaling_factor``),
  either ``[C, H, W]`` with ``C * 4`` = the transformer's ``in_channels`` (packed here into one
  token per 2x2 block, as ``FluxPipeline._pack_latents`` does) or already packed
  ``[h * w, in_channels]`` together with an integer ``latent_hw`` = ``[h, w]`` (the token grid);
- ``prompt_embeds``: ``[T, joint_attention_dim]`` (the T5 states);
- ``pooled_prompt_embeds``: ``[pooled_projection_dim]`` (the CLIP pooled output).

A leading batch dim of 1, as the pipeline returns them, is accepted. ``save_sample`` writes such a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .diffusion import Latent
from .errors import DataError

SUFFIX = ".safetensors"
KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` -> ``[H/2 * W/2, C * 4]``: token (i, j) holds the 2x2 block at rows 2i.., columns 2j..,
    channels ordered (c, dh, dw), tokens row-major -- FluxPipeline's layout."""
    channels, height, width = latents.shape
    blocks = latents.reshape(channels, height // 2, 2, width // 2, 2).permute(1, 3, 0, 2, 4)
    return blocks.reshape((height // 2) * (width // 2), channels * 4)


def save_sample(path: str | Path, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                latent_hw: tuple[int, int] | None = None) -> Path:
    """Write one training sample; pass ``latent_hw`` when ``latents`` are already packed tokens."""
    from safetensors.torch import save_file

    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
    if latent_hw is not None:
        tensors["latent_hw"] = torch.tensor(latent_hw, dtype=torch.int64)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)


def sample_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix != SUFFIX:
            raise DataError(f"unsupported Flux data file {path.name}: use a dir of {SUFFIX} files "
                            "(latents, prompt_embeds, pooled_prompt_embeds)")
        return [path]
    files = sorted(p for p in path.rglob(f"*{SUFFIX}") if p.is_file())
    if not files:
        raise DataError(f"{path} holds no {SUFFIX} files")
    return files


def read_latents(path: str | Path, config: Mapping[str, Any], seq_len: int) -> list[Latent]:
    """Every sample under ``path`` (a file, or a dir read in name order), checked against the model config."""
    return [read_sample(file, config, seq_len) for file in sample_files(path)]


def _unbatch(tensor: torch.Tensor, dims: int) -> torch.Tensor:
    return tensor[0] if tensor.dim() == dims + 1 and tensor.shape[0] == 1 else tensor


def read_sample(file: Path, config: Mapping[str, Any], seq_len: int) -> Latent:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises its own error type, OSError...
        raise DataError(f"cannot read {file}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    for key in KEYS:
        if key not in tensors:
            raise DataError(f"{file} has no {key!r} tensor (it has {', '.join(map(repr, tensors)) or 'none'})")
        if not tensors[key].is_floating_point():
            raise DataError(f"{file}: {key!r} is {tensors[key].dtype}, not a float tensor")
    x0, height, width = _tokens(file, tensors, config["in_channels"])
    text = _unbatch(tensors["prompt_embeds"], 2)
    if text.dim() != 2 or text.shape[1] != config["joint_attention_dim"]:
        raise DataError(f"{file}: 'prompt_embeds' has shape {list(text.shape)}, expected [tokens, {config['joint_attention_dim']}] "
                        f"(joint_attention_dim)")
    pooled = _unbatch(tensors["pooled_prompt_embeds"], 1)
    if pooled.dim() != 1 or pooled.shape[0] != config["pooled_projection_dim"]:
        raise DataError(f"{file}: 'pooled_prompt_embeds' has shape {list(pooled.shape)}, expected [{config['pooled_projection_dim']}] "
                        f"(pooled_projection_dim)")
    sample = Latent(x0=x0.float(), height=height, width=width, encoder_hidden_states=text.float(),
                    pooled_projections=pooled.float())
    if sample.num_tokens > seq_len:
        raise DataError(f"{file} has {sample.num_tokens} tokens ({text.shape[0]} text + {x0.shape[0]} image), "
                        f"more than seq_len={seq_len}; raise --seq-len")
    return sample


def _tokens(file: Path, tensors: Mapping[str, torch.Tensor], in_channels: int) -> tuple[torch.Tensor, int, int]:
    """The latent tokens ``[h * w, in_channels]`` and the token grid (h, w)."""
    if "latent_hw" in tensors:
        tokens, grid = _unbatch(tensors["latents"], 2), tensors["latent_hw"].flatten()
        if grid.is_floating_point() or grid.numel() != 2:
            raise DataError(f"{file}: 'latent_hw' must be two integers [h, w], got {grid.tolist()}")
        height, width = (int(v) for v in grid)
        if tokens.dim() != 2 or tokens.shape[1] != in_channels or tokens.shape[0] != height * width:
            raise DataError(f"{file}: packed 'latents' have shape {list(tokens.shape)}, expected [{height} * {width}, {in_channels}] "
                            f"(latent_hw, in_channels)")
        return tokens, height, width
    latents = _unbatch(tensors["latents"], 3)
    if latents.dim() != 3:
        raise DataError(f"{file}: 'latents' have shape {list(latents.shape)}, expected [C, H, W] "
                        f"(or packed [tokens, {in_channels}] with 'latent_hw')")
    channels, height, width = latents.shape
    if channels * 4 != in_channels:
        raise DataError(f"{file}: 'latents' have {channels} channels; the model's in_channels={in_channels} "
                        f"takes {in_channels // 4} (2x2 blocks of C channels make a token)")
    if height % 2 or width % 2:
        raise DataError(f"{file}: 'latents' are {height} x {width}; H and W must be even (2x2 blocks make a token)")
    return pack_2x2(latents), height // 2, width // 2
