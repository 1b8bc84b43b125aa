"""Every code block of README.md, docs/*.md and a run's INTEGRATION_GUIDE.md runs, or its doc says why not.

Each document runs top to bottom in a scratch folder that links the repository's data/, configs/,
docs/ and examples/, so its commands run as written, and state carries from block to block (a run
trained by one block is asked, served and exported by the next ones):
- bash: `bash -e -o pipefail`. `.venv/bin/afinar` and `afinar` are this checkout's CLI, each call its
  own process (tests/snippet_exec.py); `afinar train` / `demo` / `compare --train` train the tiny
  random model for one step instead of the preset's model and schedule. `afinar serve ...` starts in
  the background on a free port (`--port 0`) and the block goes on once /health is ready;
  `localhost:8000` then means that server, in this block and the next ones. `curl` fails on an HTTP
  error. Variables the block exports reach the blocks after it.
- python: this venv's Python. js: node, as an ES module, with the Express example's `openai` package.
- json: must parse. yaml: a config that `afinar config --config FILE` accepts.
A block that cannot run here carries `<!-- snippet: skip (why) -->` on the line before it;
`<!-- snippet: setup COMMAND -->` runs a bash command first; a block marked `<!-- snippet: output -->`
shows what the block before it prints, and must appear in that output. Every other block must run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
LINKED = ("data", "configs", "docs", "examples", "scripts", "benchmarks", "notebooks")
NODE_MODULES = REPO / "examples" / "express" / "node_modules"
PORT = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(skip|setup|output)\b\s*(.*?)\s*-->\s*$")
RUNNABLE = {"bash", "sh", "shell", "python", "js", "javascript", "json", "yaml"}
# What a training snippet trains here: always the tiny model for one step (FORCED), and small
# validation and test files unless the command names its own.
FORCED = ("model.base", "train.max_steps", "train.batch_size", "train.grad_accumulation", "train.max_seq_length",
          "train.save_every")

PRELUDE = r"""
set -eo pipefail
curl() { command curl --fail-with-body --silent --show-error --max-time 300 "$@"; echo; }
serve_in_background() {  # `afinar serve ...` as written, on a free port, until /health says ready
  "$@" --port 0 > "$SNIPPET_STATE/serve.log" 2>&1 &
  echo $! > "$SNIPPET_STATE/serve.pid"
  local port=""
  for _ in $(seq 1 3000); do
    port=$(sed -nE 's#.*listening on http://[^ ]*:([0-9]+).*#\1#p' "$SNIPPET_STATE/serve.log" | head -n 1)
    if [ -n "$port" ] && command curl -sf "http://127.0.0.1:$port/health" > /dev/null; then
      export SNIPPET_PORT=$port
      return 0
    fi
    kill -0 "$(cat "$SNIPPET_STATE/serve.pid")" 2> /dev/null || { cat "$SNIPPET_STATE/serve.log"; return 1; }
    sleep 0.1
  done
  cat "$SNIPPET_STATE/serve.log"
  return 1
}
trap 'env -0 > "$SNIPPET_STATE/env"' EXIT
"""


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)
    output: bool = False  # shows what the previous block prints


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with the snippet markers on the lines just above them."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        block = Block(start + 1, lang.lower(), "\n".join(body) + "\n")
        j = start - 1
        while j >= 0 and (marker := MARKER.match(lines[j])):
            kind, value = marker.groups()
            if kind == "skip":
                block.skip = value or "no reason given"
            elif kind == "output":
                block.output = True
            else:
                block.setup.insert(0, value)
            j -= 1
        blocks.append(block)
        i += 1
    return blocks


class SnippetFailed(AssertionError):
    pass


class DocRunner:
    """Runs one document's blocks in order in `sandbox`, carrying the environment and a server."""

    def __init__(self, name: str, sandbox: Path, env: dict[str, str]):
        self.name, self.sandbox = name, sandbox
        self.state = sandbox / ".snippet"
        self.state.mkdir(parents=True)
        for link in LINKED:
            if (REPO / link).exists():
                (sandbox / link).symlink_to(REPO / link)
        if NODE_MODULES.is_dir():
            (sandbox / "node_modules").symlink_to(NODE_MODULES)
        bin_dir = sandbox / ".venv" / "bin"  # `.venv/bin/afinar` as the docs write it
        bin_dir.mkdir(parents=True)
        for tool, names in {"afinar": ("afinar",), "python": ("python", "python3")}.items():
            for name_ in names:
                script = bin_dir / name_
                script.write_text(f"#!{sys.executable} -S\nimport sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
                                  f"import snippet_exec\nsnippet_exec.client({tool!r})\n")
                script.chmod(0o755)
        self.env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SNIPPET_STATE": str(self.state)}
        self.count, self.last_output = 0, None

    def run(self, block: Block) -> None:
        self.count += 1
        if block.output:
            if self.last_output is None or block.code.strip() not in self.last_output:
                raise SnippetFailed(f"{self.name}:{block.line}: the output shown is not what the block before it printed:\n"
                                    f"{self.last_output}")
            return
        for command in block.setup:
            self._exec(block, ["bash", "-eo", "pipefail", "-c", command], command)
        lang = {"sh": "bash", "shell": "bash", "javascript": "js"}.get(block.lang, block.lang)
        getattr(self, f"_{lang}")(block)

    def _bash(self, block: Block) -> None:
        code = re.sub(r"^(\s*)((?:\S*/)?afinar serve\b)", r"\1serve_in_background \2", block.code, flags=re.M)
        code = PORT.sub("127.0.0.1:${SNIPPET_PORT:?no afinar serve was started before this line}", code)
        script = self.state / f"block{self.count}.sh"
        script.write_text(PRELUDE + code)
        try:
            self._exec(block, ["bash", str(script)], block.code)
        finally:
            dump = self.state / "env"
            if dump.is_file():
                pairs = (item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
                self.env = {k: v for k, v in pairs if k not in ("PWD", "OLDPWD", "SHLVL", "_")}
                dump.unlink()

    def _python(self, block: Block) -> None:
        script = self.state / f"block{self.count}.py"
        script.write_text(self._with_port(block))
        self._exec(block, [str(self.sandbox / ".venv" / "bin" / "python"), str(script)], block.code)

    def _js(self, block: Block) -> None:
        if shutil.which("node") is None:  # CI has node; a developer's machine may not
            warnings.warn(f"{self.name}:{block.line}: node is not installed, so this Node snippet did not run")
            return
        if not NODE_MODULES.is_dir():
            raise SnippetFailed(f"{NODE_MODULES} is missing: run (cd examples/express && npm ci), as `make test` does")
        script = self.sandbox / f".block{self.count}.mjs"  # inside the sandbox: node finds node_modules from there
        script.write_text(self._with_port(block))
        self._exec(block, ["node", str(script)], block.code)

    def _json(self, block: Block) -> None:
        try:
            json.loads(block.code)
        except ValueError as e:
            raise SnippetFailed(f"{self.name}:{block.line}: the JSON block does not parse: {e}") from None

    def _yaml(self, block: Block) -> None:
        if not isinstance(yaml.safe_load(block.code), dict):
            raise SnippetFailed(f"{self.name}:{block.line}: the YAML block is not a mapping")
        config = self.state / f"block{self.count}.yaml"
        config.write_text(block.code)
        self._exec(block, [str(self.sandbox / ".venv" / "bin" / "afinar"), "config", "--config", str(config)], block.code)

    def _with_port(self, block: Block) -> str:
        if PORT.search(block.code) and "SNIPPET_PORT" not in self.env:
            raise SnippetFailed(f"{self.name}:{block.line}: calls localhost:8000, but no earlier block started `afinar serve`")
        return PORT.sub(f"127.0.0.1:{self.env.get('SNIPPET_PORT')}", block.code)

    def _exec(self, block: Block, cmd: list[str], shown: str) -> None:
        try:
            done = subprocess.run(cmd, cwd=self.sandbox, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=600)
            output, code = done.stdout, done.returncode
        except subprocess.TimeoutExpired as e:
            output, code = (e.stdout or b"").decode(errors="replace"), "timeout"  # bytes, even with text=True
        self.last_output = output
        if code != 0:
            log = self.state / "serve.log"
            server = f"\n--- afinar serve log ---\n{log.read_text()[-3000:]}" if log.is_file() else ""
            raise SnippetFailed(f"{self.name}:{block.line} ({block.lang}) failed (exit {code}):\n{shown}\n"
                                f"--- output ---\n{output[-6000:]}{server}")

    def close(self) -> None:
        """Stop the server a block started, if any."""
        pid_file = self.state / "serve.pid"
        if not pid_file.is_file():
            return
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)  # the client passes it on: the server drains and exits
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child of the (already finished) bash may linger as a zombie
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def run_document(name: str, text: str, sandbox: Path, env: dict[str, str]) -> list[str]:
    """Run every block of a document; the skipped ones are returned as 'LINE: reason'."""
    runner, skipped = DocRunner(name, sandbox, env), []
    try:
        for block in code_blocks(text):
            if block.skip:
                skipped.append(f"{block.line}: {block.skip}")
            elif block.lang in RUNNABLE or block.output:
                runner.run(block)
            else:
                raise SnippetFailed(f"{name}:{block.line}: a {block.lang or 'plain'} block this test cannot run. Make it "
                                    "bash/python/js/json/yaml, or put `<!-- snippet: skip (why) -->` on the line before it.")
    finally:
        runner.close()
    return skipped


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def exec_socket(tmp_path_factory):
    """The warm process that runs the snippets' commands (Linux; elsewhere each command starts Python afresh)."""
    if sys.platform != "linux":
        yield None
        return
    path = tmp_path_factory.mktemp("exec") / "socket"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "snippet_exec.py"), "serve", str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "tests/snippet_exec.py did not start"
        yield str(path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def snippet_env(exec_socket, tiny_model, tmp_path_factory) -> dict[str, str]:
    """The environment the blocks run in: offline, the shrinking overrides, the command server."""
    from afinar.data import resolve_path

    small = tmp_path_factory.mktemp("small-data")
    for split in ("val", "test"):
        lines = resolve_path(f"bundled:farense/{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        (small / f"{split}.jsonl").write_text("".join(lines[:4]), encoding="utf-8")
    shrink = [f"model.base={tiny_model}", "train.max_steps=1", "train.batch_size=2", "train.grad_accumulation=1",
              "train.max_seq_length=128", "train.save_every=0", f"data.val={small / 'val.jsonl'}",
              f"data.test={small / 'test.jsonl'}"]
    env = {**os.environ, "AFINAR_SNIPPET_SHRINK": json.dumps(shrink), "AFINAR_SNIPPET_FORCE": json.dumps(FORCED),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("AFINAR_API_KEY", None)
    if exec_socket:
        env["AFINAR_SNIPPET_SOCKET"] = exec_socket
    return env


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("doc", DOCS)
def test_doc_snippets_run(doc, snippet_env, tmp_path):
    skipped = run_document(doc, (REPO / doc).read_text(encoding="utf-8"), tmp_path / "sandbox", snippet_env)
    for reason in skipped:
        assert re.search(r"\(.+\)", reason), f"{doc}:{reason}: say why in parentheses"


def test_integration_guide_snippets_run(snippet_env, tmp_path):
    from afinar.synthetic import make_tiny_run

    run = make_tiny_run(tmp_path / "runs" / "tiny")
    guide = (run / "INTEGRATION_GUIDE.md").read_text(encoding="utf-8")
    assert run_document("INTEGRATION_GUIDE.md", guide, tmp_path / "sandbox", snippet_env) == []


def test_blocks_markers_and_failures_are_recognised(snippet_env, tmp_path):
    text = "\n".join([
        "Intro", "<!-- snippet: skip (needs an NVIDIA GPU) -->", "```bash", "nvidia-smi", "```",
        "- a list item:", "  <!-- snippet: setup echo '{\"question\": \"q\"}' > q.jsonl -->", "  ```bash",
        "  test -s q.jsonl && export FROM_BLOCK=yes", "  ```",
        "```python", "import os; print('seen:', os.environ['FROM_BLOCK'])", "```",
        "<!-- snippet: output -->", "```", "seen: yes", "```",
        "```json", '{"answer": "..."}', "```", "```", "plain text", "```",
    ])
    blocks = code_blocks(text)
    assert [(b.line, b.lang, b.skip, b.output) for b in blocks] == [
        (3, "bash", "(needs an NVIDIA GPU)", False), (8, "bash", None, False), (11, "python", None, False),
        (15, "", None, True), (18, "json", None, False), (21, "", None, False)]
    assert blocks[1].setup == ["echo '{\"question\": \"q\"}' > q.jsonl"] and blocks[1].code.startswith("test -s")
    # The last block is neither runnable nor marked: the document fails, after running the others.
    with pytest.raises(SnippetFailed, match=r"doc.md:21: a plain block"):
        run_document("doc.md", text, tmp_path / "a", snippet_env)
    failing = {"bash": "afinar no-such-command", "python": "raise SystemExit(3)", "json": "{'single': 'quotes'}",
               "yaml": "train:\n  lerning_rate: 1\n"}
    for lang, code in failing.items():
        with pytest.raises(SnippetFailed, match=r"doc.md:1"):
            run_document("doc.md", f"```{lang}\n{code}\n```\n", tmp_path / lang, snippet_env)
    with pytest.raises(SnippetFailed, match=r"doc.md:5: the output shown is not"):
        run_document("doc.md", "```python\nprint(1 + 1)\n```\n<!-- snippet: output -->\n```\n3\n```\n",
                     tmp_path / "output", snippet_env)
