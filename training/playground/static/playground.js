// The Kiln playground page: plain JavaScript against the JSON API in app.py.
// Every error the server sends ({"error": ...}) is shown in #status; nothing is checked
// here that the server does not check too, so the page and the API cannot disagree.
"use strict";

const $ = (id) => document.getElementById(id);
let config = { allow_promote: false, max_images: 8, defaults: {} };
let guidanceSet = false; // the user typed a guidance: sent, and model changes keep it
let versions = [];

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, body, method) {
  const init = body === undefined ? { method: method || "GET" } : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new Error("the playground server does not answer: " + e.message);
  }
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function label(v) {
  const tags = v.aliases.length ? ` (${v.aliases.join(", ")})` : "";
  return `v${v.version}${tags}`;
}

function fillModels() {
  for (const id of ["model-a", "model-b"]) {
    const sel = $(id);
    sel.innerHTML = "";
    for (const v of versions) sel.add(new Option(label(v), v.version));
  }
  const byAlias = (a) => versions.find((v) => v.aliases.includes(a));
  const a = byAlias("champion") || versions[0];
  const b = byAlias("challenger") || versions.find((v) => v !== a) || a;
  if (a) $("model-a").value = a.version;
  if (b) $("model-b").value = b.version;
}

function fmt(x) {
  return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(4)) : String(x);
}

const SHOWN = ["acc_all", "acc_all_seen", "acc_all_held_out", "clip_score", "fd_clip", "val_loss"];
const LINEAGE = ["git.commit", "kiln.data", "kiln.parent", "kiln.rows_new"];

function showInfo(side) {
  const box = $("info-" + side);
  const v = versions.find((x) => x.version === $("model-" + side).value);
  box.innerHTML = "";
  if (!v) return;
  const head = document.createElement("div");
  for (const a of v.aliases) {
    const s = document.createElement("span");
    s.className = "alias";
    s.textContent = "@" + a;
    head.append(s);
  }
  head.append(`registered ${new Date(v.created * 1000).toLocaleString()}`);
  box.append(head);
  const table = document.createElement("table");
  const rows = SHOWN.filter((k) => k in v.metrics).map((k) => [k, fmt(v.metrics[k])]);
  if (v.gate.gate_decision) rows.push(["gate", `${v.gate.gate_decision}` +
    (v.gate.gate_source === "hand" ? " (by hand)" : "")]);
  for (const k of LINEAGE) {
    const val = v.lineage[k];
    if (val !== undefined) rows.push([k, val.length > 14 ? val.slice(0, 12) + "…" : val]);
  }
  for (const [k, val] of rows) {
    const tr = table.insertRow();
    tr.insertCell().textContent = k;
    tr.insertCell().textContent = val;
  }
  box.append(table);
  if (config.allow_promote && !v.aliases.includes("champion")) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "promote";
    b.id = "promote-" + side;
    b.textContent = `Make v${v.version} @champion`;
    b.onclick = () => promote(v.version);
    box.append(b);
  }
}

async function loadSchedulers() {
  const ref = $("model-a").value;
  if (!ref) return;
  try {
    const m = await api("/api/model?ref=" + encodeURIComponent(ref));
    const sel = $("scheduler");
    const keep = sel.value; // "": each version's own sampler (sent as null)
    sel.innerHTML = "";
    sel.add(new Option(`its own (${m.scheduler})`, ""));
    for (const s of m.schedulers) sel.add(new Option(s, s));
    sel.value = m.schedulers.includes(keep) ? keep : "";
    // the scale this version's evaluation chose, until the user sets one
    if (!guidanceSet && m.guidance != null) $("guidance").value = m.guidance;
  } catch (e) {
    say(e.message, true);
  }
}

async function loadVersions() {
  try {
    versions = (await api("/api/versions")).versions;
  } catch (e) {
    versions = [];
    say(e.message, true);
    $("registry-note").textContent = "registry unavailable";
    return;
  }
  if (!versions.length) {
    say("no kiln-text2image version is registered yet: run `kiln run` first", true);
    return;
  }
  $("registry-note").textContent = `kiln-text2image: ${versions.length} version(s)`;
  fillModels();
  showInfo("a");
  showInfo("b");
  await loadSchedulers();
}

function number(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const n = parse(raw);
  return Number.isNaN(n) ? raw : n;
}

function settings() {
  return {
    prompt: $("prompt").value,
    negative: $("negative").value,
    seed: number("seed", (s) => (/^\d+$/.test(s) ? Number(s) : NaN)),
    n: number("count", (s) => (/^\d+$/.test(s) ? Number(s) : NaN)),
    steps: number("steps", (s) => (/^\d+$/.test(s) ? Number(s) : NaN)),
    // until the user sets one: null, so each version samples at its own chosen scale
    guidance: guidanceSet ? number("guidance", Number) : null,
    // until the user picks one: null, so each version samples with its own sampler
    scheduler: $("scheduler").value || null,
  };
}

function busy(on) {
  for (const id of ["generate", "compare"]) $(id).disabled = on;
}

async function submit(models) {
  busy(true);
  $("progress").hidden = true;
  try {
    const job = await api("/api/generate", { models, ...settings() });
    const stop = $("cancel");
    stop.hidden = false;
    stop.onclick = () =>
      api(`/api/jobs/${job.id}?token=${job.token}`, undefined, "DELETE").catch((e) =>
        say(e.message, true),
      );
    await follow(job.id);
  } catch (e) {
    say(e.message, true);
  } finally {
    $("cancel").hidden = true;
    busy(false);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function follow(id) {
  for (;;) {
    const job = await api("/api/jobs/" + id);
    if (job.state === "queued") {
      say(`waiting: ${job.position} job(s) ahead in the queue, this one included`);
    } else if (job.state === "running") {
      const p = $("progress");
      p.hidden = false;
      p.max = Math.max(job.total_steps, 1);
      p.value = job.done_steps;
      say(`sampling: step ${job.done_steps} of ${job.total_steps}`);
    } else if (job.state === "error") {
      $("progress").hidden = true;
      throw new Error(job.error);
    } else if (job.state === "cancelled") {
      $("progress").hidden = true;
      say("cancelled");
      return;
    } else {
      $("progress").hidden = true;
      show(job);
      await loadGallery();
      say(`done: ${job.results.reduce((n, r) => n + r.images.length, 0)} image(s)`);
      return;
    }
    await sleep(250);
  }
}

function figure(file, caption) {
  const f = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "/gallery/" + file;
  img.alt = caption;
  const c = document.createElement("figcaption");
  c.textContent = caption + " ";
  const a = document.createElement("a");
  a.href = img.src;
  a.download = file.split("/").pop();
  a.textContent = "download";
  c.append(a);
  f.append(img, c);
  return f;
}

function show(job) {
  const out = $("results");
  out.innerHTML = "";
  const s = job.settings;
  for (const r of job.results) {
    const side = document.createElement("div");
    side.className = "side";
    side.dataset.version = r.version;
    const h = document.createElement("h3");
    const v = versions.find((x) => `kiln-text2image/${x.version}` === r.version);
    h.textContent = v ? `kiln-text2image ${label(v)}` : r.version;
    side.append(h);
    if (r.note) {
      const n = document.createElement("div");
      n.className = "muted";
      n.textContent = r.note;
      side.append(n);
    }
    const grid = document.createElement("div");
    grid.className = "grid";
    for (const im of r.images) {
      grid.append(figure(im.file,
        `seed ${im.seed} · ${s.steps} steps · guidance ${im.guidance ?? s.guidance} · ` +
        `${im.scheduler ?? r.scheduler ?? s.scheduler}`));
    }
    side.append(grid);
    out.append(side);
  }
}

async function loadGallery() {
  try {
    const items = (await api("/api/gallery?limit=24")).items;
    const g = $("gallery");
    g.innerHTML = "";
    for (const it of items) g.append(figure(it.file, `${it.prompt} · ${it.model_version} · seed ${it.seed}`));
  } catch (e) {
    /* the gallery is a convenience; the status line keeps the job's message */
  }
}

async function promote(version) {
  if (!confirm(`Make kiln-text2image v${version} @champion? Consumers of @champion get it next.`)) return;
  try {
    await api("/api/promote", { version, confirm: version });
    say(`v${version} is now @champion`);
    await loadVersions();
  } catch (e) {
    say(e.message, true);
  }
}

async function init() {
  try {
    config = await api("/api/config");
  } catch (e) {
    say(e.message, true);
  }
  const d = config.defaults || {};
  $("steps").value = d.steps ?? 20;
  $("guidance").value = d.guidance ?? ""; // the chosen version's own, once loaded
  $("guidance").oninput = () => { guidanceSet = true; };
  $("negative").value = d.negative ?? "";
  $("count").max = config.max_images;
  $("random-seed").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); };
  $("form").onsubmit = (ev) => { ev.preventDefault(); submit([$("model-a").value]); };
  $("compare").onclick = () => submit([$("model-a").value, $("model-b").value]);
  $("model-a").onchange = () => { showInfo("a"); loadSchedulers(); };
  $("model-b").onchange = () => showInfo("b");
  await loadVersions();
  await loadGallery();
  document.body.dataset.ready = "1";
}

init();
