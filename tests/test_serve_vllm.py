"""Scale-out: a run's PEFT adapter folder is one vLLM's LoRA loader takes, as the README's command serves it.

vLLM is not installed here (CUDA only); the checks restate what its loader requires
(vllm/lora/peft_helper.py `PEFTHelper.from_dict` / `validate_legal`, vllm/config/lora.py,
and `parse_fine_tuned_lora_name` in vllm/lora/utils.py):
- adapter_config.json has `r` (> 0), `lora_alpha`, `target_modules`;
- no feature vLLM refuses: bias other than "none", `modules_to_save`, DoRA, `lora_bias`,
  PiSSA/OLoRA-style `init_lora_weights`, aLoRA, layer replication, BD-LoRA, QALoRA;
- the rank is at most `--max-lora-rank` (16 unless given; one of 1, 8, 16, 32, 64, 128, 256, 320, 512);
- every tensor is `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` on a module vLLM
  can adapt in Llama/Mistral/Qwen2 (q/k/v/o, gate/up/down projections), A [r, in] and B [out, r].
"""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
KEY = re.compile(r"^base_model\.model\.(?P<module>.+\.(?P<leaf>\w+))\.lora_(?P<ab>[AB])\.weight$")


def vllm_problems(folder) -> list[str]:
    """What vLLM's LoRA loader would refuse in this adapter folder (empty: it loads)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    r = config.get("r", 0)
    if not isinstance(r, int) or r <= 0:
        problems.append(f"r={r!r}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    for key in ("modules_to_save", "use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication",
                "use_bdlora", "use_qalora"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        problems.append(f"init_lora_weights={init!r}")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    problems += [f"target module {t!r} is not one vLLM adapts" for t in targets if t not in LORA_MODULES]
    ranks = {r, *(config.get("rank_pattern") or {}).values()}
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        for name in f.keys():
            m = KEY.match(name)
            if not m or m["leaf"] not in LORA_MODULES:
                problems.append(f"tensor {name!r} is not a LoRA A/B weight of a supported module")
                continue
            shape = f.get_slice(name).get_shape()
            rank = shape[0] if m["ab"] == "A" else shape[1]
            if rank not in ranks:
                problems.append(f"{name}: rank {rank} is not the config's {sorted(ranks)}")
    return problems


def max_lora_rank_flag(folder) -> str:
    """`--max-lora-rank N` when the adapter's rank exceeds vLLM's default of 16, else ''."""
    config = json.loads((folder / "adapter_config.json").read_text())
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if rank <= VLLM_DEFAULT_MAX_RANK:
        return ""
    return f"--max-lora-rank {next(v for v in VLLM_RANKS if v >= rank)}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from afinar.synthetic import make_tiny_run

    return make_tiny_run(tmp_path_factory.getbasetemp() / "serving" / "run")


def test_a_run_adapter_is_what_vllm_loads(run):
    assert vllm_problems(run) == []
    assert max_lora_rank_flag(run) == ""  # the default recipe's rank 8: no flag


def test_the_cpu_preset_recipe_needs_max_lora_rank_32(make_cfg, tmp_path):
    """rank 32 on every linear layer (configs/cpu.yaml): loadable, with --max-lora-rank 32."""
    from afinar import models
    from afinar.backends.torch_train import TorchTrainer

    cfg = make_cfg("lora.rank=32", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    backend = TorchTrainer(cfg)
    backend.load(models.resolve(cfg.model.base))
    backend.save_adapter(tmp_path)
    assert vllm_problems(tmp_path) == []
    assert max_lora_rank_flag(tmp_path) == "--max-lora-rank 32"
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_problems(tmp_path) == ["modules_to_save=['lm_head']"]  # the check does refuse what vLLM refuses
