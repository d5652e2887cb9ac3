"""The editing pipeline a model folder needs: SDXL's (a second text encoder) or SD's."""

from __future__ import annotations

import os

from ip2p_jax.pipelines.edit import EditPipeline
from ip2p_jax.pipelines.sdxl_edit import SDXLEditPipeline
from ip2p_jax.weights.model_folder import resolve_model


def edit_pipeline_class(model: str | os.PathLike) -> type[EditPipeline]:
    """SDXLEditPipeline for a folder with text_encoder_2/ (as diffusers' SDXL pipelines save
    them), EditPipeline otherwise."""
    folder = resolve_model(model)
    return SDXLEditPipeline if (folder / "text_encoder_2").is_dir() else EditPipeline


def load_edit_pipeline(
    model: str | os.PathLike, *, cosxl_edit: bool = False, **options
) -> EditPipeline:
    """``from_pretrained`` of the folder's pipeline class (see `edit_pipeline_class`);
    ``cosxl_edit`` for a CosXL Edit folder (SDXL only)."""
    pipeline_class = edit_pipeline_class(model)
    if pipeline_class is SDXLEditPipeline:
        return SDXLEditPipeline.from_pretrained(model, cosxl_edit=cosxl_edit, **options)
    if cosxl_edit:
        raise ValueError(f"--cosxl-edit is for SDXL folders (text_encoder_2/); {model} is not")
    return pipeline_class.from_pretrained(model, **options)
