"""Config: defaults, presets, error messages that name the key, the value and the fix."""

from __future__ import annotations

import pytest

from afinar.config import (
    PRESETS_DIR,
    VALID_KEYS,
    Config,
    closest_key,
    describe_fields,
    load_config,
    preset_names,
    preset_path,
)
from afinar.errors import AfinarError

EXPECTED_PRESETS = ["cpu", "mac-8gb", "mac-16gb", "mac-32gb", "cuda-24gb", "cuda-80gb"]


def write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(AfinarError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_defaults_validate():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.base == "smollm2-135m-instruct"
    assert cfg.model.quantization == "nf4" and cfg.method == "qlora"
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    # a validated default config survives a JSON round trip unchanged (what a run folder stores)
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg


def test_method_follows_quantization():
    assert load_config(None, ["model.quantization=none"]).method == "lora"
    assert load_config(None, ["model.quantization=nf4"]).method == "qlora"


@pytest.mark.parametrize("name", EXPECTED_PRESETS)
def test_every_expected_preset_exists(name):
    """Fails (never skips) when a preset is missing: the README and `--preset auto` name all of them."""
    assert (PRESETS_DIR / f"{name}.yaml").is_file(), f"preset {name} missing from {PRESETS_DIR}"
    assert name in preset_names()


@pytest.mark.parametrize("name", sorted(set(EXPECTED_PRESETS) | set(preset_names())))
def test_preset_loads(name):
    path = preset_path(name)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # a preset changes something: it is not an empty file
    assert cfg != Config(), f"preset {name} only repeats the defaults"


def test_cpu_preset_is_cpu_friendly():
    cfg = load_config(preset_path("cpu"))
    assert cfg.model.base == "smollm2-135m-instruct"  # the embedded model: works offline
    assert cfg.model.compute_dtype in ("float32", "auto")


def test_unknown_preset_suggests_closest():
    msg = error_of(preset_path, "cpuu")
    assert "cpuu" in msg
    if (PRESETS_DIR / "cpu.yaml").is_file():
        assert "'cpu'" in msg


def test_unknown_yaml_key_names_key_value_and_closest(tmp_path):
    path = write(tmp_path, "train: {lerning_rate: 1e-3}\n")
    msg = error_of(load_config, path)
    assert "train.lerning_rate" in msg
    assert "1e-3" in msg
    assert "train.learning_rate" in msg.replace("train.lerning_rate", "")
    assert str(path) in msg


def test_unknown_top_level_section(tmp_path):
    msg = error_of(load_config, write(tmp_path, "trian:\n  max_steps: 3\n"))
    assert "trian" in msg and "did you mean 'train'?" in msg  # the section, not some key inside it


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("train: {batch_size: 0}\n", "train.batch_size", "0"),
        ("model: {quantization: int3}\n", "model.quantization", "int3"),
        ("lora: {rank: -1}\n", "lora.rank", "-1"),
        ("lora: {dropout: 1.5}\n", "lora.dropout", "1.5"),
        ("train: {epochs: .inf}\n", "train.epochs", "finite"),
        ("train: {report_to: tb}\n", "train.report_to", "'tb'"),  # one name, as target_modules takes it  # an endless schedule, once crashed after loading
        ("train: {learning_rate: 1e400}\n", "train.learning_rate", "finite"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path, text, key, value):
    msg = error_of(load_config, write(tmp_path, text))
    assert key in msg
    assert value in msg


def test_cross_field_rule_is_reported(tmp_path):
    msg = error_of(load_config, write(tmp_path, "model: {quantization: nf4, compute_dtype: float16}\n"))
    assert "float16" in msg and "nf4" in msg


def test_set_overrides_parse_types():
    cfg = load_config(None, [
        "train.max_steps=200",
        "train.learning_rate=1e-4",
        "lora.target_modules=[q_proj,v_proj]",
        "data.val=null",
        "train.group_by_length=false",
    ])
    assert cfg.train.max_steps == 200 and type(cfg.train.max_steps) is int
    assert cfg.train.learning_rate == pytest.approx(1e-4) and type(cfg.train.learning_rate) is float
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.val is None
    assert cfg.train.group_by_length is False


def test_set_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n  batch_size: 4\n")
    cfg = load_config(path, ["train.max_steps=20"])
    assert cfg.train.max_steps == 20
    assert cfg.train.batch_size == 4  # untouched keys of the file survive


def test_set_string_with_colon_stays_a_string():
    # A system prompt is free text; "Responde: ..." must not be read as a YAML mapping.
    cfg = load_config(None, ["data.system_prompt=Responde sempre em português: curto e exato."])
    assert cfg.data.system_prompt == "Responde sempre em português: curto e exato."


def test_unknown_set_key_suggests_closest():
    msg = error_of(load_config, None, ["train.lerning_rate=1"])
    assert "train.lerning_rate" in msg
    assert "did you mean 'train.learning_rate'" in msg


def test_set_without_equals_is_explained():
    msg = error_of(load_config, None, ["train.max_steps"])
    assert "key=value" in msg


def test_a_section_set_as_a_key_is_named():
    msg = error_of(load_config, None, ["train=3"])
    assert "'train' is a section" in msg and "--set train." in msg


def test_bad_set_value_names_key_and_value():
    msg = error_of(load_config, None, ["train.batch_size=0"])
    assert "train.batch_size" in msg and "0" in msg
    # a list cut short was taken as the text "[q_proj, v_proj" and failed only after the model loaded
    msg = error_of(load_config, None, ["lora.target_modules=[q_proj, v_proj"])
    assert "not a valid YAML list" in msg and "lora.target_modules=[a, b]" in msg


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  base: x\ntrain: [a\n  b: c\n")
    msg = error_of(load_config, path)
    assert f"{path}:" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert line in (3, 4)  # the unclosed list starts on line 3, the parser notices on line 4
    assert "YAML" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    msg = error_of(load_config, write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing\n")) == Config()


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = error_of(load_config, missing)
    assert str(missing) in msg and "not found" in msg


def test_closest_key_and_reference():
    assert closest_key("train.lerning_rate") == "train.learning_rate"
    assert closest_key("lora.rnak") == "lora.rank"
    keys = [k for k, _, _ in describe_fields()]
    assert keys == VALID_KEYS
    assert "train.learning_rate" in keys and "model.quantization" in keys
    # every setting is documented
    assert all(desc for _, _, desc in describe_fields())


def test_split_keys_is_off_or_a_real_piece(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  split_keys: 3\n", encoding="utf-8")
    with pytest.raises(AfinarError) as info:
        load_config(bad, [])
    assert "serve.split_keys = 3" in str(info.value) and "at least 64" in str(info.value)
    assert load_config(bad, ["serve.split_keys=256"]).serve.split_keys == 256
