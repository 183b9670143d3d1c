// The chat page: streams /v1/chat/completions (server-sent events over fetch), Stop aborts it.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let model = null;
let controller = null;  // AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || resp.statusText;
  } catch (_) {
    return resp.statusText || "HTTP " + resp.status;
  }
}

async function loadModel() {
  $("model-name").textContent = "loading model…";
  try {
    const resp = await fetch("v1/models", { headers: headers() });
    if (!resp.ok) throw new Error(resp.status === 401 ? "enter the API key" : await errorText(resp));
    model = (await resp.json()).data[0].id;
    $("model-name").textContent = model.split("/").pop();
    $("model-name").title = model;
    $("model-name").className = "";
  } catch (err) {
    model = null;
    $("model-name").textContent = "no model: " + err.message;
    $("model-name").className = "muted";
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(body, meta);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return { div, body, meta };
}

function numberOr(id, fallback) {
  const v = $(id).value.trim();
  return v === "" ? fallback : Number(v);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: numberOr("temperature", 0.7), top_p: numberOr("top-p", 1),
    max_tokens: numberOr("max-tokens", 256),
  };
  const seed = numberOr("seed", null);
  if (seed !== null) body.seed = seed;
  return body;
}

// Yields the parsed JSON of each `data:` event until [DONE].
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("clear").disabled = busy;
}

function statsLine(tokens, exact, t0, tFirst, tEnd, stopped) {
  const parts = [(exact ? "" : "~") + tokens + " tokens"];
  if (tFirst !== null) {
    // Generation speed after the first token; the first token's wait is shown apart.
    const rate = tokens > 1 && tEnd > tFirst ? (tokens - 1) / ((tEnd - tFirst) / 1000) : 0;
    parts.push(rate.toFixed(1) + " tok/s");
    parts.push("first token " + ((tFirst - t0) / 1000).toFixed(2) + " s");
  }
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.div.id = "answer-" + history.length;
  answer.div.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "generating…";

  const t0 = performance.now();
  let tFirst = null, chunks = 0, usage = null, stopped = false, failed = null;
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const ev of events(resp)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) usage = ev.usage;
      const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
      if (delta && delta.content) {
        if (tFirst === null) tFirst = performance.now();
        chunks += 1;
        answer.body.textContent += delta.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") stopped = true;
    else failed = err.message;
  }
  const tEnd = performance.now();
  controller = null;
  setBusy(false);

  const reply = answer.body.textContent;
  if (failed !== null) {
    answer.div.classList.add("error");
    answer.body.textContent = reply ? reply + "\n\n" + failed : failed;
    answer.div.dataset.state = "error";
    $("status").textContent = "error";
  } else {
    const tokens = usage ? usage.completion_tokens : chunks;  // a chunk is about one token
    const line = statsLine(tokens, usage !== null, t0, tFirst, tEnd, stopped);
    answer.meta.textContent = line;
    answer.div.dataset.state = stopped ? "stopped" : "done";
    $("status").textContent = line;
  }
  if (reply) history.push({ role: "assistant", content: reply });
  else history.pop();  // nothing came back: forget the question too
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

$("clear").addEventListener("click", () => {
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});

function keyChanged(e) {
  if (e) e.preventDefault();
  sessionStorage.setItem("flashserve-api-key", $("api-key").value);
  loadModel();
}
$("api-key").addEventListener("change", keyChanged);
$("key-form").addEventListener("submit", keyChanged);

$("api-key").value = sessionStorage.getItem("flashserve-api-key") || "";
loadModel();
