// A chat backend for afinar: POST /chat answers through `afinar serve` with the official
// openai client, plain JSON or streamed to the browser as server-sent events.
//
//   AFINAR_BASE_URL=http://127.0.0.1:8000/v1 AFINAR_API_KEY=... node server.js   # then open http://127.0.0.1:3000
//
// The same code works against any OpenAI-compatible server (vLLM serving the run's adapter
// with --enable-lora, or an `afinar export --merged` model): only the base URL and model change.
"use strict";

const path = require("node:path");
const express = require("express");
const { OpenAI } = require("openai");

const ROLES = new Set(["user", "assistant"]);

function createApp({
  baseURL = process.env.AFINAR_BASE_URL || "http://127.0.0.1:8000/v1",
  apiKey = process.env.AFINAR_API_KEY || "none", // the client needs a value; afinar checks it only when started with a key
  model = process.env.AFINAR_MODEL || "afinar", // afinar serves one run whatever the name
  maxTokens = Number(process.env.AFINAR_MAX_TOKENS || 256),
} = {}) {
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 1, timeout: 120_000 });
  const app = express();
  app.use(express.json({ limit: "64kb" }));
  app.use(express.static(path.join(__dirname, "public")));

  // { message: "...", history?: [{role, content}], stream?: boolean, maxTokens?: number }
  app.post("/chat", async (req, res) => {
    const { message, history = [], stream = false } = req.body ?? {};
    if (typeof message !== "string" || !message.trim()) {
      return sendError(res, 400, 'Send {"message": "your question"} as JSON.');
    }
    if (!Array.isArray(history) || !history.every((m) => ROLES.has(m?.role) && typeof m.content === "string")) {
      return sendError(res, 400, "history must be a list of {role: 'user'|'assistant', content: string}.");
    }
    const request = {
      model,
      messages: [...history, { role: "user", content: message }],
      max_tokens: Math.min(Number(req.body.maxTokens) || maxTokens, maxTokens),
    };
    try {
      if (!stream) {
        const reply = await client.chat.completions.create(request);
        return res.json({ reply: reply.choices[0].message.content, usage: reply.usage });
      }
      const events = await client.chat.completions.create({ ...request, stream: true });
      // A browser that closes the tab stops generation: aborting closes the upstream stream,
      // and afinar frees the request's batch row.
      res.on("close", () => events.controller.abort());
      res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
      try {
        for await (const chunk of events) {
          const delta = chunk.choices[0]?.delta?.content;
          if (delta) res.write(`data: ${JSON.stringify({ delta })}\n\n`);
        }
        res.write("data: [DONE]\n\n");
      } catch (err) {
        if (!res.destroyed) res.write(`event: error\ndata: ${JSON.stringify({ error: describe(err) })}\n\n`);
      }
      return res.end();
    } catch (err) {
      // afinar's own 4xx (bad key, full queue) and 503 (loading, draining for a restart: retry
      // later, or on another instance) reach the browser as they are; anything else is a 502.
      const status = (err.status >= 400 && err.status < 500) || err.status === 503 ? err.status : 502;
      if (err.headers?.get?.("retry-after")) res.set("Retry-After", err.headers.get("retry-after"));
      return res.status(status).json({ error: describe(err) });
    }
  });
  return app;
}

function describe(err) {
  return { message: err.error?.message || err.message, type: err.error?.type || "upstream_error" };
}

function sendError(res, status, message) {
  return res.status(status).json({ error: { message, type: "invalid_request_error" } });
}

if (require.main === module) {
  const port = Number(process.env.PORT || 3000);
  const host = process.env.HOST || "127.0.0.1";
  createApp().listen(port, host, () => console.log(`chat UI on http://${host}:${port}`));
}

module.exports = { createApp };
