"""The run folder: everything a trained adapter needs to be reloaded, audited and served.

A run is written into `<output>.partial/` and renamed to `<output>/` only when complete,
so a crashed or interrupted run never leaves a folder that looks finished.

  adapter_model.safetensors, adapter_config.json   the adapter, PEFT format
  mlx/adapters.safetensors, mlx/adapter_config.json the same adapter in mlx-lm's format
  training_config.json                             the resolved config (reloads the run)
  qlora_config.json | lora_config.json             quantization + LoRA settings
  metadata.json                                    base model + hash, data hashes, versions, device, timings, memory, losses
  training_state.json                              step-by-step log
  metrics.jsonl                                    the same, one JSON line per event, appended as it happens
  loss.png                                         train and validation loss curves
  INTEGRATION_GUIDE.md                             how to call this run from the CLI, HTTP and Node
  checkpoints/step_NNNNNNN/, checkpoints/best/     resumable states and the best adapter (see checkpoints.py)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from afinar import adapters, atomic, checkpoints
from afinar.config import Config, build_config
from afinar.errors import AfinarError

RUN_FILES = (
    "adapter_model.safetensors", "adapter_config.json", "training_config.json", "metadata.json",
    "training_state.json", "metrics.jsonl", "loss.png", "INTEGRATION_GUIDE.md",
)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RunWriter:
    """Collects a run in `<output>.partial/`; `finish()` makes it appear atomically."""

    output: Path
    history: list[dict] = field(default_factory=list)

    @property
    def tmp(self) -> Path:
        return self.output.with_name(self.output.name + ".partial")

    @classmethod
    def create(cls, output: str | Path, overwrite: bool = False, cfg: Config | None = None) -> "RunWriter":
        output = Path(output)
        if output.exists() and not overwrite:
            raise AfinarError(f"Output folder {output} already exists. Choose another --output, or pass --overwrite to replace it.")
        writer = cls(output)
        if writer.tmp.exists():
            saved = checkpoints.step_checkpoints(writer.tmp)
            if saved and not overwrite:
                raise AfinarError(
                    f"{writer.tmp} holds an unfinished run with a checkpoint at step {saved[-1][0]}. "
                    f"Continue it with: afinar train --resume {output}  (or pass --overwrite to start over)."
                )
            shutil.rmtree(writer.tmp)
        writer.tmp.mkdir(parents=True)
        checkpoints.folder(writer.tmp).mkdir()
        if cfg is not None:  # first thing written: what a resume must match
            atomic.write_json(writer.tmp / "training_config.json", cfg.model_dump(mode="json"))
        return writer

    @classmethod
    def reopen(cls, output: str | Path, cfg: Config, force: bool = False) -> "RunWriter":
        """The unfinished run at `<output>.partial/`, checked against `cfg`."""
        output = Path(output)
        writer = cls(output)
        saved_cfg = writer.tmp / "training_config.json"
        if not saved_cfg.is_file():
            done = " It has finished already." if (output / "metadata.json").is_file() else ""
            raise AfinarError(f"Nothing to resume: {writer.tmp} does not hold an unfinished run.{done}")
        before = _flatten(json.loads(saved_cfg.read_text(encoding="utf-8")))
        after = _flatten(cfg.model_dump(mode="json"))
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if differ and not force:
            changes = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differ)
            raise AfinarError(f"The config differs from the run being resumed ({changes}). "
                              "Resume with the same settings, or pass --force to continue anyway.")
        if differ:
            atomic.write_json(saved_cfg, cfg.model_dump(mode="json"))
        return writer

    def truncate(self, step: int) -> None:
        """Forget metrics logged after `step` (work lost with the crash) and reload the rest."""
        path = self.tmp / "metrics.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by the crash
                break
            if record.get("step", 0) > step:
                break
            kept.append(record)
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.history = kept

    def log(self, record: dict) -> None:
        """Append one metrics record (a training step or an evaluation)."""
        self.history.append(record)
        with open(self.tmp / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_state(self, state: dict) -> None:
        atomic.write_json(self.tmp / "training_state.json", {**state, "log_history": self.history})

    def finish(self, cfg: Config, metadata: dict, state: dict) -> Path:
        tmp = self.tmp
        atomic.write_json(tmp / "training_config.json", cfg.model_dump(mode="json"))
        atomic.write_json(tmp / f"{cfg.method}_config.json", {
            "method": cfg.method,
            "quantization": cfg.model.quantization,
            "double_quant": cfg.model.double_quant if cfg.method == "qlora" else None,
            "compute_dtype": metadata.get("device", {}).get("compute_dtype", cfg.model.compute_dtype),
            **cfg.lora.model_dump(mode="json"),
        })
        self.write_state(state)
        adapter = tmp / "adapter_model.safetensors"
        adapters.peft_to_mlx(tmp, tmp / adapters.MLX_SUBDIR)  # same weights, for mlx_lm.load(adapter_path=)
        metadata = {**metadata, "adapter": {"file": adapter.name, "bytes": adapter.stat().st_size, "sha256": file_sha256(adapter)}}
        atomic.write_json(tmp / "metadata.json", metadata)
        plot_losses(self.history, tmp / "loss.png", title=self.output.name)
        atomic.write_text(tmp / "INTEGRATION_GUIDE.md", integration_guide(self.output, cfg, metadata))
        atomic.make_readable(tmp)
        atomic.fsync_tree(tmp)
        old = None
        if self.output.exists():  # --overwrite: swap, then delete the old run
            old = self.output.with_name(self.output.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.output, old)
        os.replace(tmp, self.output)
        atomic.fsync_dir(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def load_run(path: str | Path) -> tuple[Config, dict]:
    """(config, metadata) of a finished run folder, with a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        partial = path.with_name(path.name + ".partial")
        extra = f" ({partial} exists: that run did not finish)" if partial.exists() else ""
        raise AfinarError(f"Run folder not found: {path}{extra}. Train one with: afinar train --output {path}")
    missing = [f for f in ("training_config.json", "adapter_config.json", "adapter_model.safetensors") if not (path / f).is_file()]
    if missing:
        raise AfinarError(f"{path} is not a complete afinar run: missing {', '.join(missing)}.")
    raw = json.loads((path / "training_config.json").read_text(encoding="utf-8"))
    cfg = build_config(raw, source=str(path / "training_config.json"))
    meta_file = path / "metadata.json"
    metadata = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    return cfg, metadata


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def integration_guide(output: Path, cfg: Config, metadata: dict) -> str:
    name = output.name
    q = "Qual foi a melhor classificação do Farense?"
    loss = metadata.get("final_val_loss")
    loss_line = f"Final validation loss: {loss:.4f}. " if isinstance(loss, (int, float)) else ""
    return f"""# Integration guide: `{name}`

Base model `{cfg.model.base}`, {cfg.method.upper()} (quantization `{cfg.model.quantization}`, LoRA rank {cfg.lora.rank} on {", ".join(cfg.lora.target_modules)}).
{loss_line}Generated by afinar {metadata.get("afinar_version", "")} on {metadata.get("finished_at", "")}.

## Command line
```bash
afinar ask {output} "{q}"
# -> {{"answer": "...", "model": "...", "adapter": "...", "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": 0, "tokens_per_s": 0}}
echo '{{"question": "{q}"}}' | afinar ask {output} --stdin   # one JSON line per input line
```
Errors are one JSON object on stderr, with a non-zero exit code.

{serving_guide(output, name, q)}
## Python
```python
from afinar.inference import Predictor
bot = Predictor("{output}")
print(bot.ask("{q}"))
```

## Plain PEFT (no afinar needed)
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{metadata.get("base_model", {}).get("path", cfg.model.base)}")
model = PeftModel.from_pretrained(base, "{output}")
```
{"For this QLoRA run, pass the same `BitsAndBytesConfig` as training (NF4, double quant: see `qlora_config.json`) to `from_pretrained` to compute exactly what was trained; afinar itself answers on CPU with the NF4 weights dequantized and the adapter merged, which is the same function." if cfg.method == "qlora" else ""}

## Apple Silicon: plain mlx-lm (no afinar needed)
```python
from mlx_lm import load, generate
model, tokenizer = load("{metadata.get("base_model", {}).get("path", cfg.model.base)}", adapter_path="{output}/mlx")
```
`afinar export {output} --merged OUT` writes base + adapter as one plain Hugging Face model
(dequantized, full precision) for transformers, vLLM or `mlx_lm.load(OUT)`.
"""


def serving_guide(output: Path, name: str, q: str) -> str:
    """The HTTP part of INTEGRATION_GUIDE.md: `afinar serve` and the OpenAI clients that talk to it."""
    return f"""## HTTP API (`afinar serve`)
```bash
export AFINAR_API_KEY=$(openssl rand -hex 16)      # optional; without it the server needs no key
afinar serve {output} --port 8000                  # binds 127.0.0.1; loads the model once
curl -s localhost:8000/health                      # {{"status": "ready", "model": "{name}"}}
curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer $AFINAR_API_KEY" \\
  -H 'Content-Type: application/json' \\
  -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "{q}"}}], "max_tokens": 128}}'
curl -s localhost:8000/v1/ask -H "Authorization: Bearer $AFINAR_API_KEY" -H 'Content-Type: application/json' \\
  -d '{{"question": "{q}"}}'                        # the same object as `afinar ask`
```
OpenAI's chat completions API: `stream: true` sends server-sent events ending in `data: [DONE]`;
concurrent requests are generated together in batches. Errors are `{{"error": {{"message", "type", "code"}}}}`
with 400/401/413/422, 429 (+ `Retry-After`) when the queue is full, 503 while loading or on timeout.
The spec is at `/openapi.json`.

### Python (`pip install openai`)
```python
import os
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ.get("AFINAR_API_KEY", "none"))
messages = [{{"role": "user", "content": "{q}"}}]
reply = client.chat.completions.create(model="{name}", messages=messages)
print(reply.choices[0].message.content)
for chunk in client.chat.completions.create(model="{name}", messages=messages, stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
```

### Node (`npm install openai`; a full Express app with a chat page: afinar's `examples/express/`)
```js
const {{ OpenAI }} = require("openai");
const client = new OpenAI({{ baseURL: "http://127.0.0.1:8000/v1", apiKey: process.env.AFINAR_API_KEY || "none" }});
const reply = await client.chat.completions.create({{ model: "{name}", messages: [{{ role: "user", content: "{q}" }}] }});
console.log(reply.choices[0].message.content);
```
When one machine is no longer enough, `afinar export --merged` gives a plain Hugging Face model that
vLLM serves with the same API (`vllm serve MERGED_DIR`): these clients work unchanged, only the base URL moves.
"""
