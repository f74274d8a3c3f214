// The kiosk page: draw a digit, ask the edge agent over v2 REST, show the answer, where it came
// from and how sure it is; a provisional answer is replaced in place when the cloud's arrives
// (a Server-Sent Events stream of the ticket's result).
//
// URL parameters: model (default "digits"); escalation (auto, never, always; default: the
// agent's); timeout, the latency budget in seconds (default 2); client_id, which results are
// this screen's when several share a token; agent, the agent's base URL when this page is
// served from elsewhere (that origin must be in rest_cors_origins). When the agent asks for a
// token, give it in the fragment, which the browser never sends to a server: #token=...
"use strict";

const params = new URLSearchParams(location.search);
const agent = (params.get("agent") || "").replace(/\/+$/, "");
const model = params.get("model") || "digits";
const escalation = params.get("escalation");
const timeout = params.get("timeout") || "2";
const clientId = params.get("client_id");
const token = new URLSearchParams(location.hash.slice(1)).get("token");

const pad = document.getElementById("pad");
const ink = pad.getContext("2d", { willReadFrequently: true });
const result = document.getElementById("result");
const show = {
  answer: document.getElementById("answer"),
  source: document.getElementById("source"),
  confidence: document.getElementById("confidence"),
  note: document.getElementById("note"),
};
let inputName = "X";
let stream = null;

function clearPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.lineWidth = 22;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#000";
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  pad.setPointerCapture(event.pointerId);
  ink.beginPath();
  ink.moveTo(...point(event));
});
pad.addEventListener("pointermove", (event) => {
  if (!pad.hasPointerCapture(event.pointerId)) return;
  ink.lineTo(...point(event));
  ink.stroke();
});
pad.addEventListener("pointerup", (event) => pad.releasePointerCapture(event.pointerId));

// As scikit-learn's digits were made: the ink's bounding box scaled into a 32x32 bitmap, whose
// 4x4 blocks are counted, giving 8x8 values of 0..16.
function features() {
  const { data, width, height } = ink.getImageData(0, 0, pad.width, pad.height);
  let top = height, left = width, bottom = -1, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[(y * width + x) * 4] < 128) {
        top = Math.min(top, y); bottom = Math.max(bottom, y);
        left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  if (bottom < 0) return null;
  const side = Math.max(bottom - top, right - left) + 1;
  const cx = (left + right + 1) / 2, cy = (top + bottom + 1) / 2;
  const small = document.createElement("canvas");
  small.width = small.height = 32;
  const s = small.getContext("2d", { willReadFrequently: true });
  s.fillStyle = "#fff";
  s.fillRect(0, 0, 32, 32);
  s.drawImage(pad, cx - side / 2, cy - side / 2, side, side, 2, 2, 28, 28);
  const bits = s.getImageData(0, 0, 32, 32).data;
  const values = new Array(64).fill(0);
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) {
      if (bits[(y * 32 + x) * 4] < 128) values[Math.floor(y / 4) * 8 + Math.floor(x / 4)] += 1;
    }
  }
  return values;
}

function setState(state, answer, source, confidence, note) {
  result.dataset.state = state;
  show.answer.textContent = answer;
  show.source.textContent = source;
  show.confidence.textContent = confidence;
  show.note.textContent = note || "";
}

function percent(value) {
  return `${Math.round(value * 100)} % sure`;
}

const FROM = {
  edge: "answered on this device",
  cloud: "answered by the cloud model",
  queue: "answered on this device for now: the cloud's answer will replace it",
};

function closeStream() {
  if (stream !== null) stream.close();
  stream = null;
}

function authorized(headers = {}) {
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

async function call(path, options = {}) {
  const response = await fetch(agent + path, { ...options, headers: authorized(options.headers) });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function classify() {
  const values = features();
  if (values === null) {
    setState("idle", "–", "Draw a digit first.", "");
    return;
  }
  closeStream();
  setState("asking", "…", "asking the agent", "");
  const request = {
    inputs: [{ name: inputName, datatype: "FP32", shape: [1, 64], data: values }],
    outputs: [{ name: "label" }],
  };
  request.parameters = {};
  if (escalation) request.parameters.escalation = escalation;
  if (clientId) request.parameters.client_id = clientId;
  let answer;
  try {
    answer = await call(`/v2/models/${encodeURIComponent(model)}/infer`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Request-Timeout": timeout },
      body: JSON.stringify(request),
    });
  } catch (error) {
    setState("error", "!", `The agent did not answer: ${error.message}`, "");
    return;
  }
  const facts = answer.parameters || {};
  const label = answer.outputs.find((o) => o.name === "label").data[0];
  const state = facts.provisional ? "provisional" : facts.route === "cloud" ? "cloud" : "edge";
  setState(state, String(label), `${FROM[facts.route] || facts.route} (${facts.reason})`, percent(facts.confidence));
  if (facts.provisional && facts.ticket) follow(facts.ticket);
}

// The ticket's result, pushed when the link to the cloud carries the request.
function follow(ticket) {
  const query = new URLSearchParams({ ticket });
  if (clientId) query.set("client_id", clientId);
  const url = `/router/v1/results?${query}`;
  const onResult = (ended) => {
    if (ended.ticket !== ticket) return;
    closeStream();
    if (ended.state !== "delivered") {
      result.dataset.state = "final";
      show.note.textContent = `The cloud will not answer (${ended.state}); this answer stands.`;
      return;
    }
    const label = ended.outputs.find((o) => o.name === "label");
    const scores = ended.outputs.find((o) => o.name === "probabilities");
    setState(
      "final",
      String(label.data[0]),
      "answered by the cloud model (it replaced the provisional answer)",
      scores ? percent(Math.max(...scores.data)) : "",
    );
  };
  stream = token ? readEvents(url, onResult) : eventSource(url, onResult);
}

// EventSource reconnects by itself and resumes after the last event it saw (Last-Event-ID).
function eventSource(url, onResult) {
  const source = new EventSource(agent + url);
  source.addEventListener("result", (event) => onResult(JSON.parse(event.data)));
  return source;
}

// EventSource cannot send a token: the same stream read with fetch, which can, reconnecting
// and resuming as EventSource would.
function readEvents(url, onResult) {
  const controller = new AbortController();
  let lastId = null;
  (async () => {
    while (!controller.signal.aborted) {
      try {
        const headers = authorized(lastId === null ? {} : { "Last-Event-ID": lastId });
        const response = await fetch(agent + url, { headers, signal: controller.signal });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const message = parseEvent(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (message.id !== null) lastId = message.id;
            if (message.event === "result" && message.data) onResult(JSON.parse(message.data));
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  })();
  return { close: () => controller.abort() };
}

function parseEvent(block) {
  const message = { event: "message", data: "", id: null };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") message.event = value;
    else if (field === "data") message.data += (message.data ? "\n" : "") + value;
    else if (field === "id") message.id = value;
  }
  return message;
}

async function watchLink() {
  try {
    const status = await call("/router/v1/status");
    const waiting = Object.values(status.queue_depth_by_priority).reduce((a, b) => a + b, 0);
    document.getElementById("link").textContent = status.cloud_configured
      ? `cloud link: ${status.link_state} · ${waiting} waiting`
      : "cloud link: none configured";
  } catch (error) {
    document.getElementById("link").textContent = `agent unreachable: ${error.message}`;
  }
}

async function start() {
  clearPad();
  document.getElementById("clear").addEventListener("click", () => {
    closeStream();
    clearPad();
    setState("idle", "–", "Draw a digit 0–9 in the box, then press Classify.", "");
  });
  document.getElementById("classify").addEventListener("click", classify);
  try {
    const metadata = await call(`/v2/models/${encodeURIComponent(model)}`);
    inputName = metadata.inputs[0].name;
  } catch (error) {
    setState("error", "!", `Model ${model}: ${error.message}`, "");
  }
  watchLink();
  setInterval(watchLink, 5000);
}

start();
