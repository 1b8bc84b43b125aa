// End to end: a real `afinar serve` on the tiny test model (free port), this Express app in
// front of it, and the three things a chat backend needs: an answer, a stream, a refused key.
"use strict";

const { test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { spawn, execFileSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { createApp } = require("../server.js");

const REPO = path.resolve(__dirname, "../../..");
const BIN = process.env.AFINAR_VENV_BIN || path.join(REPO, ".venv", "bin");
const KEY = "sk-express-test";
const ENV = { ...process.env, OMP_NUM_THREADS: "1", MKL_NUM_THREADS: "1", HF_HUB_OFFLINE: "1", TRANSFORMERS_OFFLINE: "1" };

let tmp, afinar, afinarURL, web, webURL, output = "";

function startAfinar(run) {
  afinar = spawn(path.join(BIN, "afinar"), ["serve", run, "--port", "0"], { env: { ...ENV, AFINAR_API_KEY: KEY } });
  afinar.stdout.on("data", (d) => (output += d));
  return new Promise((resolve, reject) => {
    afinar.stderr.on("data", (d) => {
      output += d;
      const m = output.match(/listening on (http:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    afinar.on("exit", (code) => reject(new Error(`afinar serve exited (${code}):\n${output}`)));
  });
}

async function waitReady(url, seconds = 60) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    const res = await fetch(`${url}/health`).catch(() => null);
    if (res?.ok) return;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`afinar serve not ready after ${seconds} s:\n${output}`);
}

function listen(app) {
  return new Promise((resolve) => {
    const server = app.listen(0, "127.0.0.1", () => resolve(server));
  });
}

const chat = (body, base = webURL) =>
  fetch(`${base}/chat`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

before(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), "afinar-express-"));
  const run = execFileSync(path.join(BIN, "python"), ["-m", "afinar.synthetic", "tiny-run", path.join(tmp, "run")],
                           { env: ENV, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim().split("\n").pop();
  afinarURL = await startAfinar(run);
  await waitReady(afinarURL);
  // 48 tokens: enough steps that a stream shows its pieces even on a busy machine (a reader that
  // falls behind the engine gets the waiting tokens joined, so 8 fast tokens can arrive as one).
  web = await listen(createApp({ baseURL: `${afinarURL}/v1`, apiKey: KEY, maxTokens: 48 }));
  webURL = `http://127.0.0.1:${web.address().port}`;
});

after(async () => {
  web?.close();
  if (afinar && afinar.exitCode === null) {
    const exited = new Promise((r) => afinar.once("exit", r));
    afinar.kill("SIGINT");
    await exited;
  }
  if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
});

test("a question gets an answer", async () => {
  const res = await chat({ message: "Onde joga o Farense?", maxTokens: 8 });
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(typeof body.reply, "string");
  assert.ok(body.reply.trim().length > 0);
  assert.ok(body.usage.completion_tokens > 0 && body.usage.completion_tokens <= 8);
});

test("a streamed answer arrives in pieces and equals the plain one", async () => {
  const plain = await (await chat({ message: "Quem treinou o Farense?" })).json();
  const res = await chat({ message: "Quem treinou o Farense?", stream: true });
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type"), /text\/event-stream/);
  const events = (await res.text()).split("\n\n").filter(Boolean).map((b) => b.replace(/^data: /, ""));
  assert.equal(events.at(-1), "[DONE]");
  const deltas = events.slice(0, -1).map((e) => JSON.parse(e).delta);
  assert.ok(deltas.length >= 2, `expected several deltas, got ${deltas.length}: ${JSON.stringify(deltas)}`);
  assert.equal(deltas.join(""), plain.reply); // greedy decoding: same text either way
});

test("a wrong API key is refused", async () => {
  const direct = await fetch(`${afinarURL}/v1/models`, { headers: { Authorization: "Bearer wrong" } });
  assert.equal(direct.status, 401);
  assert.equal((await direct.json()).error.code, "invalid_api_key");

  const badKey = await listen(createApp({ baseURL: `${afinarURL}/v1`, apiKey: "wrong" }));
  try {
    const res = await chat({ message: "Olá?" }, `http://127.0.0.1:${badKey.address().port}`);
    assert.equal(res.status, 401);
    assert.match((await res.json()).error.message, /API key/);
  } finally {
    badKey.close();
  }
});

test("a request without a message is a 400", async () => {
  const res = await chat({ nothing: true });
  assert.equal(res.status, 400);
});
