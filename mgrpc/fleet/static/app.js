// mgrpc fleet dashboard: listens to /api/events (server-sent events) and renders each state; no
// framework, no CDN. Falls back to fetching /api/state while the event stream is down.
"use strict";

const $ = (sel) => document.querySelector(sel);
const selected = new Set();
let lastState = null;
let csrf = "";  // from /api/state: state-changing requests carry it (X-CSRF-Token)

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

function fmtBytes(n) {
  if (n == null) return "";
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(1) + " MiB";
}

function latestJobs(state) {
  // rollouts come newest first: the first job seen for a device is its latest
  const jobs = {};
  for (const r of state.rollouts) {
    for (const [id, j] of Object.entries(r.jobs)) {
      if (!(id in jobs)) jobs[id] = Object.assign({rollout: r.id, version: r.version}, j);
    }
  }
  return jobs;
}

function renderDevices(state) {
  const jobs = latestJobs(state);
  const rows = state.devices.map((d) => {
    const j = jobs[d.id];
    const pct = j ? j.percent : (d.progress && d.progress.state === "progress" ? d.progress.percent : null);
    const bytes = j && j.total ? `${fmtBytes(j.done)} / ${fmtBytes(j.total)}` : "";
    const bar = pct == null ? "" :
      `<div class="bar" title="${esc(bytes)}"><div style="width:${pct}%"></div></div><span class="pct">${pct}%</span>`;
    const jstate = j ? j.state : "";
    const failed = j && (j.state === "failed" || j.state === "rolled_back");
    const msg = j ? (j.error || j.message) : (d.ota && d.ota.message) || "";
    const seen = d.presence === "shadow" ? ` title="seen by its shadow reports, ${esc(ago(d.last_seen))}"` : "";
    return `<tr data-id="${esc(d.id)}">
      <td><input type="checkbox" class="sel" data-id="${esc(d.id)}" ${selected.has(d.id) ? "checked" : ""}></td>
      <td class="id" title="${esc(d.id)}">${esc(d.id)}</td><td class="arch">${esc(d.arch)}</td>
      <td class="version" title="${esc(d.build_id)}">${esc(d.version)}</td>
      <td class="committed">${d.committed ? "yes" : "<b>no</b>"}</td>
      <td class="online ${d.online ? "online" : "offline"}"${seen}>${d.online ? "online" : "offline"}</td>
      <td class="progress">${bar}<span class="bytes">${esc(bytes)}</span></td>
      <td class="jobstate st-${esc(jstate)}">${esc(jstate.replace("_", " "))}</td>
      <td class="message${failed ? " reason" : ""}" title="${esc(msg)}">${esc(msg)}</td></tr>`;
  });
  $("#devices tbody").innerHTML = rows.join("");
  const online = state.devices.filter((d) => d.online).length;
  $("#counts").textContent = `${state.devices.length} devices, ${online} online`;
}

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round(Date.now() / 1000 - t));
  return s < 60 ? `${s} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

function renderRollouts(state) {
  $("#rollouts tbody").innerHTML = state.rollouts.map((r) => {
    const sum = Object.entries(r.summary).map(([k, v]) => `${v} ${k.replace("_", " ")}`).join(", ");
    const stage = r.stage_size ? ` (first ${r.stage_size}, max ${r.max_failures} failures)` : "";
    const btn = (action, label, cls) =>
      `<button type="button" class="small ${cls || ""}" data-rollout="${esc(r.id)}" data-action="${action}">${label}</button>`;
    const controls = r.state === "running" ? btn("pause", "Pause") + btn("abort", "Abort", "danger")
      : r.state === "paused" ? btn("resume", "Resume") + btn("abort", "Abort", "danger") : "";
    return `<tr data-rollout="${esc(r.id)}"><td>${esc(r.id)}</td><td>${esc(r.version)}</td>
      <td class="method">${esc(r.method)}${r.autocommit ? ", auto-commit" : ""}, commit timeout ${r.commit_timeout}s</td>
      <td>${r.devices.length}${esc(stage)}</td><td class="rstate st-${esc(r.state)}">${esc(r.state)}</td>
      <td class="summary">${esc(sum)}</td><td class="controls">${controls}</td></tr>`;
  }).join("");
}

function render(state) {
  lastState = state;
  if (state.csrf) csrf = state.csrf;
  $("#broker").textContent = state.broker ? `broker ${state.broker}` : "no MQTT broker";
  renderDevices(state);
  renderRollouts(state);
}

async function refresh() {
  try {
    const resp = await fetch("/api/state", {cache: "no-store"});
    render(await resp.json());
  } catch (e) {
    $("#counts").textContent = "dashboard unreachable: " + e;
  }
}

function listen() {
  const live = $("#live");
  const es = new EventSource("/api/events");
  es.addEventListener("state", (ev) => {
    live.textContent = "live";
    live.className = "on";
    render(JSON.parse(ev.data));
  });
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "off"; };
  // while the stream is down, fetch now and then (EventSource reconnects on its own)
  setInterval(() => { if (es.readyState !== EventSource.OPEN) refresh(); }, 5000);
}

function say(text, isError) {
  const el = $("#form-msg");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

async function postJSON(url, body) {
  const resp = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
  const obj = await resp.json();
  if (!resp.ok) throw new Error(obj.error || resp.statusText);
  return obj;
}

async function startUpdate() {
  const file = $("#file").files[0];
  if (!file) return say("choose a fw.zip first", true);
  if (!selected.size) return say("select some devices first", true);
  $("#start").disabled = true;
  try {
    say("uploading " + file.name + " ...");
    const form = new FormData();
    form.append("file", file, file.name);
    const resp = await fetch("/api/bundles", {method: "POST", headers: {"X-CSRF-Token": csrf}, body: form});
    const bundle = await resp.json();
    if (!resp.ok) throw new Error(bundle.error || resp.statusText);
    const r = await postJSON("/api/rollouts", {
      devices: [...selected].sort(), bundle: bundle.sha, method: $("#method").value,
      commit_timeout: parseInt($("#commit-timeout").value, 10), autocommit: $("#autocommit").checked,
      stage_size: parseInt($("#stage-size").value, 10) || 0,
      max_failures: parseInt($("#max-failures").value, 10),
    });
    say(`rollout ${r.id}: ${bundle.version} to ${r.devices.length} devices by ${r.method}`);
  } catch (e) {
    say(String(e.message || e), true);
  } finally {
    $("#start").disabled = false;
  }
}

document.addEventListener("change", (ev) => {
  const t = ev.target;
  if (t.classList && t.classList.contains("sel")) {
    if (t.checked) selected.add(t.dataset.id); else selected.delete(t.dataset.id);
  } else if (t.id === "select-all" && lastState) {
    for (const d of lastState.devices) { if (t.checked) selected.add(d.id); else selected.delete(d.id); }
    renderDevices(lastState);
  }
});
$("#start").addEventListener("click", startUpdate);
$("#add-device").addEventListener("click", async () => {
  try {
    const d = await postJSON("/api/devices", {url: $("#device-url").value.trim()});
    say(`added ${d.id}`);
    $("#device-url").value = "";
  } catch (e) { say(String(e.message || e), true); }
});
$("#refresh").addEventListener("click", async () => { await postJSON("/api/devices/refresh", {}); });
document.addEventListener("click", async (ev) => {
  const t = ev.target;
  if (!t.dataset || !t.dataset.action || !t.dataset.rollout) return;
  if (t.dataset.action === "abort" && !confirm(`Abort rollout ${t.dataset.rollout}? Queued devices are skipped.`)) return;
  t.disabled = true;
  try {
    await postJSON(`/api/rollouts/${encodeURIComponent(t.dataset.rollout)}/${t.dataset.action}`, {});
    say(`rollout ${t.dataset.rollout}: ${t.dataset.action}`);
  } catch (e) { say(String(e.message || e), true); t.disabled = false; }
});
$("#poll-url").textContent = location.origin + "/update";
refresh();
listen();
