"""`afinar export`: an adapter in the other format, or a merged model for any HF-compatible engine.

  --to peft|mlx   PEFT <-> mlx-lm adapter files (afinar/adapters.py; no framework needed)
  --merged OUT    base + adapter folded into one full-precision HF folder (config, safetensors,
                  tokenizer) that transformers, vLLM or mlx-lm load with no adapter code
"""

from __future__ import annotations

import shutil
from pathlib import Path

from afinar import adapters, atomic, models
from afinar.errors import AfinarError


def adapter_source(source: Path, fmt: str) -> Path:
    """The folder under `source` (a run or an adapter folder) that holds the adapter in `fmt`."""
    if (source / "training_config.json").is_file() and fmt == "mlx":
        return source / adapters.MLX_SUBDIR
    return source


def export_adapter(source: str | Path, to: str, output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the adapter in `source` (a run, a PEFT folder or an mlx-lm folder) to format `to`."""
    source = Path(source)
    if not source.is_dir():
        raise AfinarError(f"{source}: no such folder. Pass a run folder or an adapter folder.")
    if to not in ("peft", "mlx"):
        raise AfinarError(f"--to {to!r}: choose 'peft' or 'mlx'.")
    fmt = adapters.detect_format(source)
    output = Path(output) if output else source.with_name(f"{source.name}-{to}")
    atomic.refuse_existing(output, overwrite)
    if fmt == to:  # already in that format (a run holds both): copy the files
        src = adapter_source(source, to)
        names = (adapters.PEFT_WEIGHTS, adapters.PEFT_CONFIG) if to == "peft" else (adapters.MLX_WEIGHTS, adapters.MLX_CONFIG)
        with atomic.folder(output) as tmp:
            for name in names:
                shutil.copy2(src / name, tmp / name)
        return output
    if to == "mlx":
        return adapters.peft_to_mlx(source, output)
    return adapters.mlx_to_peft(source, output)


def export_merged(run: str | Path, output: str | Path, overwrite: bool = False, backend: str | None = None) -> Path:
    """Merge a run's adapter into its base (dequantized) and save a plain HF model folder."""
    from afinar.backends import answering_backend
    from afinar.runs import load_run

    run, output = Path(run), Path(output)
    cfg, metadata = load_run(run)
    if backend:
        cfg.backend = backend
    atomic.refuse_existing(output, overwrite)
    engine = answering_backend(cfg)
    tokenizer = engine.load(models.resolve(cfg.model.base), run)
    with atomic.folder(output) as tmp:
        engine.save_merged(tmp)
        tokenizer.save_pretrained(str(tmp))
        atomic.write_json(tmp / "afinar_export.json", {
            "source_run": str(run.resolve()), "base_model": cfg.model.base, "method": cfg.method,
            "quantization_at_training": cfg.model.quantization, "backend": engine.name,
            "adapter_sha256": metadata.get("adapter", {}).get("sha256"),
            "note": "Adapter folded into the dequantized base weights; not re-quantized.",
        })
    return output
