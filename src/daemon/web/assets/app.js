// edge-inspect review page: pushed live updates, the write buttons (labels and
// controls, sent with the write token kept in this browser) and the review shortcuts.
"use strict";

const tokenKey = "edge-inspect-token";

function say(text, error) {
  const line = document.getElementById("message");
  line.textContent = text;
  line.className = error ? "error" : "";
}

// POSTs `payload` to /api/<command>; resolves to true when the daemon carried it out.
async function command(path, payload) {
  const token = localStorage.getItem(tokenKey) || "";
  const response = await fetch("/api/" + path, {
    method: "POST",
    headers: { "X-Edge-Inspect-Token": token, "Content-Type": "text/plain" },
    body: payload,
  });
  const text = (await response.text()).trim();
  say(response.ok ? path + ": " + text : path + ": " + text, !response.ok);
  return response.ok;
}

function setupToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  input.value = localStorage.getItem(tokenKey) || "";
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(tokenKey, input.value);
    say("Token saved in this browser.");
  });
}

function field(tile, name) {
  return tile.querySelector('[data-field="' + name + '"]');
}

// One pushed verdict: the camera's tile shows its picture and figures.
function showVerdict(v) {
  const tile = document.getElementById("tile-" + v.camera);
  if (!tile) return;
  field(tile, "picture").src = "/live/" + encodeURIComponent(v.camera) + ".jpg?seq=" + v.picture_seq;
  field(tile, "seq").textContent = v.seq;
  field(tile, "model").textContent = v.model;
  const part = v.part_id ? " · part " + v.part_id : "";
  field(tile, "verdict").textContent = (v.anomalous ? "ANOMALY" : "normal") + " · score " + v.normalised_score.toFixed(3) + part;
  tile.classList.toggle("anomalous", v.anomalous);
}

// Status, fps and controls change without a frame: read them every few seconds.
async function refreshState() {
  const response = await fetch("/api/state");
  if (!response.ok) return;
  const state = await response.json();
  for (const c of state.cameras) {
    const tile = document.getElementById("tile-" + c.camera);
    if (!tile) continue;
    const status = field(tile, "status");
    status.textContent = c.status;
    status.className = "status status-" + c.status;
    field(tile, "fps").textContent = c.fps.toFixed(1);
    field(tile, "sensitivity").textContent = c.sensitivity;
    const toggle = tile.querySelector('[data-command="enabled"]');
    toggle.dataset.payload = c.enabled ? "OFF" : "ON";
    toggle.textContent = c.enabled ? "Disable" : "Enable";
  }
  document.getElementById("model-name").textContent = state.model.name;
}

function setupLive() {
  const stream = new EventSource("/api/stream");
  stream.onmessage = (e) => showVerdict(JSON.parse(e.data));
  setInterval(refreshState, 3000);
  for (const tile of document.querySelectorAll(".tile")) {
    const camera = tile.dataset.camera;
    for (const button of tile.querySelectorAll("button[data-command]")) {
      button.addEventListener("click", async () => {
        const feature = button.dataset.command;
        const payload = feature === "sensitivity" ? tile.querySelector("input.sensitivity").value : button.dataset.payload;
        if (await command(camera + "/" + feature, payload)) refreshState();
      });
    }
  }
  document.getElementById("model-swap").addEventListener("click", () => {
    command("model", document.getElementById("model-select").value);
  });
}

async function label(item, verdict) {
  const body = JSON.stringify({ seq: Number(item.dataset.seq), verdict: verdict });
  if (await command(item.dataset.camera + "/label", body)) {
    item.querySelector('[data-field="label"]').textContent = verdict === "defect" ? "defect" : "not a defect";
    return true;
  }
  return false;
}

function select(items, index) {
  items.forEach((item, i) => item.classList.toggle("selected", i === index));
  if (items[index]) items[index].focus();
}

function setupReview() {
  const items = Array.from(document.querySelectorAll(".queue .alert"));
  let current = 0;
  items.forEach((item, i) => {
    item.addEventListener("focus", () => { current = i; select(items, i); });
    for (const button of item.querySelectorAll("button[data-verdict]")) {
      button.addEventListener("click", () => label(item, button.dataset.verdict));
    }
  });
  document.addEventListener("keydown", async (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || !items.length) return;
    const next = { j: current + 1, k: current - 1 }[e.key];
    if (next !== undefined) {
      current = Math.max(0, Math.min(items.length - 1, next));
      select(items, current);
    } else if (e.key === "d" || e.key === "n") {
      if (await label(items[current], e.key === "d" ? "defect" : "normal")) {
        current = Math.min(items.length - 1, current + 1);
        select(items, current);
      }
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  const page = document.body.dataset.page;
  if (page === "live") setupLive();
  if (page === "review") setupReview();
});
