"""`afinar export`: an adapter in the other format, or a merged model for any HF-compatible engine.

  --to peft|mlx   PEFT <-> mlx-lm adapter files (afinar/adapters.py; no framework needed)
  --merged OUT    base + adapter folded into one full-precision HF folder (config, safetensors,
                  tokenizer) that transformers, vLLM or mlx-lm load with no adapter code
  --to gguf OUT   the merged model as one GGUF file for llama.cpp, Ollama, LM Studio (afinar/gguf_export.py)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from afinar import adapters, atomic, models, oserrors
from afinar.errors import AfinarError
from afinar.status import status


def adapter_source(source: Path, fmt: str) -> Path:
    """The folder under `source` (a run or an adapter folder) that holds the adapter in `fmt`."""
    if (source / "training_config.json").is_file() and fmt == "mlx":
        return source / adapters.MLX_SUBDIR
    return source


def export_adapter(source: str | Path, to: str, output: str | Path | None = None, overwrite: bool = False,
                   verify: bool = True) -> Path:
    """Convert the adapter in `source` (a run, a PEFT folder or an mlx-lm folder) to format `to`."""
    source = Path(source)
    if not source.is_dir():
        from afinar.runpaths import partial
        from afinar.verify import run_not_found

        if partial(source).exists() or source.with_name(source.name + ".old").is_dir():
            raise run_not_found(source)  # an unfinished or half-replaced run: say how to finish it
        raise AfinarError(f"{source}: no such folder. Pass a run folder or an adapter folder.")
    if to not in ("peft", "mlx"):
        raise AfinarError(f"--to {to!r}: choose 'peft' or 'mlx' (adapter formats), or 'gguf' (a merged GGUF file).")
    if (source / "training_config.json").is_file():  # a run folder: what is converted must be what was trained
        from afinar.runs import load_run

        load_run(source, verify=verify, check_base=False)
    fmt = adapters.detect_format(source)
    output = Path(output) if output else source.with_name(f"{source.name}-{to}")
    atomic.refuse_existing(output, overwrite)
    oserrors.check_writable(output)
    with oserrors.writing(output):
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


def export_merged(run: str | Path, output: str | Path, overwrite: bool = False, backend: str | None = None,
                  verify: bool = True) -> Path:
    """Merge a run's adapter into its base (dequantized) and save a plain HF model folder."""
    from afinar.runs import load_run

    run, output = Path(run), Path(output)
    cfg, metadata = load_run(run, verify=verify)
    atomic.refuse_existing(output, overwrite)
    oserrors.check_writable(output, flag="--merged")  # now, not after loading and merging the model
    return _merge(run, cfg, metadata, backend, output, output, "--merged")


def _merge(run: Path, cfg, metadata: dict, backend: str | None, folder: Path, target: Path, flag: str) -> Path:
    """Load `run`'s base with its adapter and write them merged into `folder`. A write the machine refuses
    is named after `target`, the output the user gave as `flag`: a GGUF export merges into a temporary folder."""
    from afinar.backends import answering_backend

    if backend:
        cfg.backend = backend
    engine = answering_backend(cfg)
    with status(f"Loading {cfg.model.base} with the adapter of {run}"):
        tokenizer = engine.load(models.resolve(cfg.model.base), run)
    with status(f"Merging the adapter into the dequantized base and writing {folder}"), \
            oserrors.writing(target, flag=flag), atomic.folder(folder) as tmp:
        engine.save_merged(tmp)
        tokenizer.save_pretrained(str(tmp))
        atomic.write_json(tmp / "afinar_export.json", {
            "source_run": str(run.resolve()), "base_model": cfg.model.base, "method": cfg.method,
            "quantization_at_training": cfg.model.quantization, "backend": engine.name,
            "adapter_sha256": metadata.get("adapter", {}).get("sha256"),
            "note": "Adapter folded into the dequantized base weights; not re-quantized.",
        })
    return folder


def export_gguf(run: str | Path, output: str | Path, qtype: str = "f16", overwrite: bool = False,
                backend: str | None = None, verify: bool = True) -> Path:
    """Merge a run into its base (as `export_merged`) and write the result as one GGUF file."""
    from afinar import gguf_export
    from afinar.runs import load_run

    run, output = Path(run), Path(output)
    if output.suffix != ".gguf":
        raise AfinarError(f"{output}: a GGUF file name must end in .gguf, e.g. {output.with_suffix('.gguf')}.")
    atomic.refuse_existing(output, overwrite)
    oserrors.check_writable(output, flag="OUT.gguf", file_name=f"{run.name}.gguf")
    if qtype not in gguf_export.QTYPES:
        raise AfinarError(f"--type {qtype!r}: choose one of {', '.join(gguf_export.QTYPES)}.")
    cfg, metadata = load_run(run, verify=verify)
    base = models.resolve(cfg.model.base)
    if base.is_local:  # say it now, not after minutes of merging
        gguf_export.check_supported(json.loads((Path(base.path) / "config.json").read_text()), f"{base.path}/config.json")
    with oserrors.writing(output, flag="OUT.gguf"):
        output.parent.mkdir(parents=True, exist_ok=True)
    # The merged folder is as large as the model: build it beside the output, not in a small /tmp.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        merged = _merge(run, cfg, metadata, backend, Path(tmp) / "merged", output, "OUT.gguf")
        with oserrors.writing(output, flag="OUT.gguf"):
            return gguf_export.write_gguf(merged, output, qtype)
