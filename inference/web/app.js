// The page's behaviour: text search, image search and zero-shot classification through the JSON API.
// Everything shown that comes from the server or the user is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let chosenFile = null;
let maxUploadMb = 10;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// FastAPI errors are {"detail": "..."} or, for validation, {"detail": [{"msg": ...}, ...]}.
async function errorText(response) {
  try {
    const body = await response.json();
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return body.detail || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  if (!response.ok) throw new Error(await errorText(response));
  return response.json();
}

function showResults(results, what) {
  const grid = $("results");
  grid.replaceChildren();
  for (const r of results) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = r.url;
    img.alt = r.path;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = r.path;
    path.title = r.path;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score.toFixed(3);
    caption.append(path, score);
    figure.append(img, caption);
    grid.append(figure);
  }
  setStatus(`${results.length} images for ${what}, best first (score = cosine similarity)`);
}

function showChart(labels) {
  const chart = $("chart");
  chart.replaceChildren();
  for (const { label, prob } of labels) {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.setAttribute("role", "listitem");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    name.title = label;
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(prob * 100).toFixed(1)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(prob * 100).toFixed(1)}%`;
    row.append(name, track, value);
    chart.append(row);
  }
}

async function searchText(event) {
  event.preventDefault();
  const q = $("query").value.trim();
  if (!q) return;
  setStatus("searching…");
  try {
    const params = new URLSearchParams({ q, k: $("k").value });
    const data = await callApi(`/api/search?${params}`);
    showResults(data.results, `“${q}”`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function chooseFile(file) {
  if (!file) return;
  if (file.size > maxUploadMb * 1024 * 1024) {
    setStatus(`${file.name} is over the ${maxUploadMb} MB upload limit`, true);
    return;
  }
  chosenFile = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  $("similar").disabled = false;
  $("classify").disabled = false;
  setStatus("");
}

function uploadForm(extra = {}) {
  const form = new FormData();
  form.append("file", chosenFile);
  for (const [key, value] of Object.entries(extra)) form.append(key, value);
  return form;
}

async function searchImage() {
  setStatus("searching…");
  try {
    const data = await callApi(`/api/search/image?k=${$("k").value}`, { method: "POST", body: uploadForm() });
    showResults(data.results, chosenFile.name);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function classify() {
  setStatus("classifying…");
  try {
    const data = await callApi("/api/classify", { method: "POST", body: uploadForm({ labels: $("labels").value }) });
    showChart(data.labels);
    setStatus(`best label: ${data.labels[0].label}`);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
}

async function init() {
  $("search-form").addEventListener("submit", searchText);
  $("similar").addEventListener("click", searchImage);
  $("classify").addEventListener("click", classify);
  setUpDrop();
  try {
    const health = await callApi("/api/health");
    maxUploadMb = health.max_upload_mb;
    $("info").textContent = `${health.images} images indexed with ${health.checkpoint}`;
  } catch (e) {
    $("info").textContent = `server not reachable: ${e.message}`;
  }
}

init();
