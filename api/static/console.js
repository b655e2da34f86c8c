// The console's only script (api/console.py): live progress over Server-Sent Events,
// the loss curve, local times. It writes text with textContent only, never innerHTML:
// job messages are user data.
"use strict";

const TERMINAL = ["succeeded", "failed", "cancelled"];

function setText(selector, text) {
  document.querySelectorAll(selector).forEach((el) => { el.textContent = text; });
}

function onProgress(jobId, data) {
  let done = null, total = null;
  if (data.rows_total) { done = data.rows_done || 0; total = data.rows_total; }
  else if (data.steps_total) { done = data.step || 0; total = data.steps_total; }
  if (total !== null) {
    document.querySelectorAll(`progress[data-bar="${jobId}"]`).forEach((bar) => {
      bar.max = total; bar.value = done;
    });
    setText(`[data-label="${jobId}"]`, `${done}/${total}`);
  }
  if (typeof data.loss === "number") addLoss(data.step ?? lossPoints.length, data.loss);
}

function onStatus(jobId, status, es, el) {
  document.querySelectorAll(`[data-status="${jobId}"]`).forEach((s) => {
    s.textContent = status; s.className = `status ${status}`;
  });
  if (TERMINAL.includes(status)) {
    es.close();
    document.querySelectorAll(`[data-cancel="${jobId}"]`).forEach((f) => f.remove());
    if (status === "succeeded") {
      document.querySelectorAll(`progress[data-bar="${jobId}"]`).forEach((b) => { b.value = b.max; });
    }
    if (el.dataset.reload) setTimeout(() => window.location.reload(), 500);
  }
}

function appendEvent(ev) {
  const list = document.getElementById("events");
  if (!list) return;
  const li = document.createElement("li");
  li.className = `ev-${ev.type} ${ev.level}`;
  const when = document.createElement("time");
  when.textContent = new Date(ev.created_at * 1000).toLocaleTimeString();
  const kind = document.createElement("b");
  kind.textContent = ev.type;
  li.append(when, " ", kind, " ", ev.message);
  list.append(li);
}

function follow(el) {
  const jobId = el.dataset.follow;
  // A job page already shows the events up to data-after: follow from there.
  const after = el.dataset.after ? `?after=${encodeURIComponent(el.dataset.after)}` : "";
  const es = new EventSource(`/ui/jobs/${encodeURIComponent(jobId)}/events${after}`);
  const seen = new Set();
  const handle = (msg) => {
    if (seen.has(msg.lastEventId)) return;  // replayed after a reconnect
    seen.add(msg.lastEventId);
    const ev = JSON.parse(msg.data);
    if (el.dataset.reload) appendEvent(ev);
    const step = ev.data && ev.data.job_id;  // a pipeline forwards its steps' progress
    if (ev.type === "progress") onProgress(step && step !== jobId ? step : jobId, ev.data || {});
    if (ev.type === "progress" && step && step !== jobId && typeof ev.data.loss === "number") {
      addLoss(ev.data.step ?? lossPoints.length, ev.data.loss);
    }
    if (ev.type === "status") onStatus(jobId, ev.message, es, el);
  };
  ["progress", "status", "log"].forEach((t) => es.addEventListener(t, handle));
}

// -- the loss curve: an SVG polyline, rescaled as points arrive ----------------------
let lossPoints = [];

function drawLoss() {
  const svg = document.getElementById("loss");
  if (!svg || !lossPoints.length) return;
  const xs = lossPoints.map((p) => p[0]), ys = lossPoints.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const pts = lossPoints.map(([x, y]) =>
    `${(((x - x0) / (x1 - x0)) * 590 + 5).toFixed(1)},${(195 - ((y - y0) / (y1 - y0)) * 190).toFixed(1)}`);
  svg.querySelector("polyline").setAttribute("points", pts.join(" "));
  const last = lossPoints[lossPoints.length - 1];
  setText("#loss-caption", `loss ${lossPoints[0][1].toFixed(3)} → ${last[1].toFixed(3)} over steps ${x0}–${last[0]} (${lossPoints.length} points; range ${y0.toFixed(3)}–${y1.toFixed(3)})`);
}

function addLoss(step, loss) {
  lossPoints.push([step, loss]);
  drawLoss();
}

document.addEventListener("DOMContentLoaded", () => {
  const svg = document.getElementById("loss");
  if (svg && svg.dataset.points) { lossPoints = JSON.parse(svg.dataset.points); drawLoss(); }
  document.querySelectorAll("time[data-ts]").forEach((t) => {
    const ts = Number(t.dataset.ts);
    if (ts) { t.dateTime = new Date(ts * 1000).toISOString(); t.textContent = new Date(ts * 1000).toLocaleString(); }
  });
  document.querySelectorAll("[data-follow]").forEach(follow);
});
