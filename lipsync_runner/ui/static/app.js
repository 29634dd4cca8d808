// Lip sync page: a reference client for the public REST API under /api/lip-sync.
//
//   POST   {API}/generate          multipart video (or avatar_id), audio, the job parameters -> 202 {job_id}
//   GET    {API}/status/{job_id}   status, stage, progress (0..1), error
//   GET    {API}/download/{job_id} the MP4
//   GET    {API}/jobs?limit=N      recent jobs, newest first (each with `inputs`: names, durations)
//   GET    {API}/jobs/{job_id}/inputs/video, .../inputs/audio, .../thumbnail.jpg   a job's inputs
//   DELETE {API}/cleanup/{job_id}  cancel if running, delete the files and the record
//   POST   {API}/cancel/{job_id}   stop a queued or running job
//   GET    {API}/params            the job parameters' JSON schema (the form's controls)
//   POST   {API}/preview           generate's form plus `at` (s) -> a short video/mp4; headers
//                                  X-Lip-Sync-Faces (a job status' `faces`, JSON) and
//                                  X-Lip-Sync-Preview: start=<s>;end=<s>
//   GET    {API}/health            open; 503 while the models load; model_version, auth
//
// Errors are JSON {"error": ..., "message"?: ..., "details"?: ...}. With auth on, every call but
// health needs "Authorization: Bearer <token>"; the token lives in sessionStorage (this tab only).
// The page shows only what applies: the token card when the service requires a token, and the
// parameters that the loaded model uses (a parameter's "x-model-versions" in the schema).
// The chosen video's first frame and a strip of its thumbnails (stage.js) set face_point and segments.
//
// Hooks for other pages' scripts: a running job whose status has `progressive: {playlist,
// playable_seconds, ended}` is handed to window.LipSyncProgressive.attach(videoEl, playlistUrl, token)
// once (progressive.js); the header links to live.html.

import { createStage } from "./stage.js";

const API = new URL(document.querySelector('meta[name="lipsync-api"]').content, document.baseURI)
  .pathname.replace(/\/+$/, "");
const TOKEN_KEY = "lipsync.token";
const JOB_KEY = "lipsync.job";
const POLL_MS = 500;
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const MODEL_VERSIONS_KEY = "x-model-versions"; // lipsync_runner/params.py

const $ = (id) => document.getElementById(id);
const FACE_POINT = "face_point"; // the parameters the stage sets (lipsync_runner/params.py)
const SEGMENTS = "segments";

// ------------------------------------------------------------------ API access

class ApiError extends Error {
  constructor(status, body, retryAfter = null) {
    super(describe(status, body, retryAfter));
    this.status = status;
    this.body = body || {};
  }
}

function describe(status, body, retryAfter) {
  const b = body && typeof body === "object" ? body : {};
  const parts = [b.error, b.message, b.details].filter((p) => typeof p === "string" && p);
  let text = parts.length ? parts.join(": ") : status ? `Request failed (HTTP ${status})` : "Request failed";
  if (!/[.!?)]$/.test(text)) text += ".";
  if (status === 429 && retryAfter) text += ` Try again in ${retryAfter} s.`;
  return text;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function readJson(res) {
  try {
    return await res.json();
  } catch {
    return {};
  }
}

async function api(method, path) {
  let res;
  try {
    res = await fetch(API + path, { method, headers: { Accept: "application/json", ...authHeaders() }, cache: "no-store" });
  } catch {
    throw new ApiError(0, { error: "Cannot reach the service (network error)" });
  }
  if (!res.ok) throw new ApiError(res.status, await readJson(res), res.headers.get("Retry-After"));
  return res;
}

/** POST /generate with XMLHttpRequest, for upload progress. Resolves with the 202 body. */
function uploadJob(form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `${API}/generate`);
    xhr.responseType = "json";
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response || {};
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body, xhr.getResponseHeader("Retry-After")));
    });
    xhr.addEventListener("error", () =>
      reject(new ApiError(0, {
        error: "The upload failed: the connection was closed",
        details: "the server may have refused a file that is too large, or it is unreachable",
      })));
    xhr.send(form);
  });
}

// ------------------------------------------------------------------ messages

function setFieldError(field, text) {
  const el = $(`${field}-error`);
  el.textContent = text || "";
  const input = $(field);
  if (input) {
    if (text) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
}

function showTopError(text) {
  const el = $("top-error");
  el.textContent = text || "";
  el.hidden = !text;
}

function clearFormErrors() {
  for (const f of ["video", "audio", ...paramFieldIds()]) setFieldError(f, "");
  showTopError("");
}

function announce(text) {
  $("announce").textContent = text;
}

/** Which field an API error belongs to: token, video, audio, a parameter's field, or top (the whole form). */
function errorField(err, files = {}) {
  if (err.status === 401) return "token";
  if (err.status !== 400 && err.status !== 413) return "top";
  const text = [err.body.error, err.body.message, err.body.details].filter(Boolean).join(" ");
  const param = shownParams().find((name) => new RegExp(`\\b${name}\\b`).test(text));
  if (param) return paramId(param);
  const video = /\bvideo\b/i.test(text);
  const audio = /\baudio\b/i.test(text);
  if (video !== audio) return video ? "video" : "audio";
  const named = ["video", "audio"].filter((k) => files[k] && text.includes(files[k].name));
  if (named.length === 1) return named[0];
  if (err.status === 413 && files.video && files.audio) {
    // The request as a whole was too large: blame the bigger file.
    return files.video.size >= files.audio.size ? "video" : "audio";
  }
  return "top";
}

function showApiError(err, files) {
  const field = errorField(err, files);
  if (field === "token") {
    showTokenError(err.message);
    return;
  }
  if (field === "top") {
    showTopError(err.message);
    if (err.status === 503) checkHealth();
    return;
  }
  setFieldError(field, err.message);
  reveal(field);
  $(field).focus();
}

/** Unfold the options when a field in them is to be seen (an error, a focus). */
function reveal(field) {
  const folded = $(field).closest("details");
  if (folded) folded.open = true;
}

function showTokenError(text) {
  setAuth(true); // a 401: the service requires a token, whatever health said
  setFieldError("token", `${text} Enter a valid API token above.`);
  $("token").focus();
}

// ------------------------------------------------------------------ health

let healthTimer = null;
const service = { modelVersion: null, auth: null }; // auth: true / false once known

async function checkHealth() {
  clearTimeout(healthTimer);
  const el = $("health");
  try {
    const res = await fetch(`${API}/health`, { cache: "no-store" });
    const body = await readJson(res);
    learnAuth(body);
    if (body.model_version) setModelVersion(body.model_version);
    if (res.ok) {
      el.dataset.state = "ready";
      el.textContent = `Ready · ${body.device || "?"} · model ${body.model_version || "?"}`;
      if (/not available/i.test($("top-error").textContent)) showTopError("");
      return;
    }
    el.dataset.state = "down";
    el.textContent = `Not ready: ${body.error || body.status || `HTTP ${res.status}`}`;
  } catch {
    el.dataset.state = "down";
    el.textContent = "The service cannot be reached";
  }
  healthTimer = setTimeout(checkHealth, 3000);
}

// ------------------------------------------------------------------ token

/** Health's "auth" (true/false, or {enabled}) when the service sends it; else ask the job list without a token. */
function learnAuth(health) {
  const auth = health && health.auth;
  if (typeof auth === "boolean") setAuth(auth);
  else if (auth && typeof auth === "object" && typeof auth.enabled === "boolean") setAuth(auth.enabled);
  else if (service.auth === null) probeAuth();
}

async function probeAuth() {
  try {
    const res = await fetch(`${API}/jobs?limit=1`, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (res.status === 401) setAuth(true);
    else if (res.ok && service.auth === null) setAuth(false);
  } catch {
    // unreachable: health says so; try again with the next health check
  }
}

function setAuth(on) {
  service.auth = on;
  $("access").hidden = !on;
}

function showTokenState() {
  $("token-state").textContent = token()
    ? "A token is set for this browser tab."
    : "Needed only if the service requires one. It is kept for this browser tab only.";
}

$("token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  setFieldError("token", "");
  showTokenState();
  if (await refreshJobs()) {
    announce(value ? "Token accepted." : "Token cleared.");
    if (current && !current.finished && !current.timer) poll(current);
  }
});

$("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  setFieldError("token", "");
  showTokenState();
  announce("Token forgotten.");
  refreshJobs();
});

// ------------------------------------------------------------------ job parameters, from their schema

let paramSchema = null; // JobParams' JSON schema
const paramValues = new Map(); // what was typed, kept when the controls are rendered again

const paramId = (name) => `param-${name}`;

function shownParams() {
  return [...$("params").querySelectorAll("[data-param]")].map((el) => el.dataset.param);
}

function paramFieldIds() {
  return shownParams().map(paramId);
}

/** GET {API}/params (open, like health): the schema the controls are made from. */
async function loadParams() {
  try {
    const res = await fetch(`${API}/params`, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (res.ok) {
      paramSchema = await res.json();
      renderParams();
      return;
    }
  } catch {
    // below
  }
  $("params-note").textContent = "The job parameters could not be loaded; jobs use the service's defaults.";
  $("params-note").hidden = false;
}

/** A property with its $ref and nullable anyOf resolved: {type, enum, default, minimum, maximum, ...}. */
function resolveProp(prop, defs) {
  let p = prop;
  if (p.$ref) p = { ...defs[p.$ref.split("/").pop()], ...p };
  const options = p.anyOf || p.oneOf;
  if (Array.isArray(options)) {
    const real = options.filter((o) => o.type !== "null");
    if (real.length === 1) p = { ...resolveProp(real[0], defs), ...p, anyOf: undefined, oneOf: undefined };
  }
  if (Array.isArray(p.allOf) && p.allOf.length === 1) p = { ...resolveProp(p.allOf[0], defs), ...p, allOf: undefined };
  return p;
}

/** A parameter marked for some MuseTalk versions is offered only once health says one of them is loaded. */
function applies(prop) {
  const versions = prop[MODEL_VERSIONS_KEY];
  return !Array.isArray(versions) || (service.modelVersion !== null && versions.includes(service.modelVersion));
}

function setModelVersion(version) {
  if (version === service.modelVersion) return;
  service.modelVersion = version;
  renderParams();
}

function shown(value) {
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function renderParams() {
  const box = $("params");
  for (const el of box.querySelectorAll("[data-param]")) paramValues.set(el.dataset.param, el.value);
  box.replaceChildren();
  if (!paramSchema) return;
  const defs = paramSchema.$defs || {};
  const notOffered = [];
  for (const [name, raw] of Object.entries(paramSchema.properties || {})) {
    const prop = resolveProp(raw, defs);
    if (applies(prop)) box.append(paramField(name, prop));
    else notOffered.push(`${name} (${prop[MODEL_VERSIONS_KEY].join(", ")} only)`);
  }
  box.dataset.modelVersion = service.modelVersion || ""; // which model the controls were chosen for
  const note = $("params-note");
  note.textContent = notOffered.length && service.modelVersion
    ? `Not offered for the loaded model (${service.modelVersion}): ${notOffered.join(", ")}.`
    : "";
  note.hidden = !note.textContent;
  stage.setSpeakerChoices(segmentSpeakerChoices());
}

/** Set a parameter's field (or the value it gets when the controls are rendered). */
function setParamValue(name, value) {
  paramValues.set(name, value);
  const el = $(paramId(name));
  if (el) {
    el.value = value;
    setFieldError(paramId(name), "");
  }
}

/** One line per parameter: its name, a control (a select for enums and booleans, first option the
 * default; else a text field with the default as placeholder), and "?" that unfolds its description. */
function paramField(name, prop) {
  const id = paramId(name);
  const field = document.createElement("div");
  field.className = "field param-field";
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = name;

  const hasDefault = prop.default !== undefined && prop.default !== null;
  const choices = Array.isArray(prop.enum) ? prop.enum : prop.type === "boolean" ? [true, false] : null;
  let input;
  if (choices) {
    input = document.createElement("select");
    const first = document.createElement("option");
    first.value = "";
    first.textContent = hasDefault ? `default (${shown(prop.default)})` : "default";
    input.append(first, ...choices.map((choice) => {
      const option = document.createElement("option");
      option.value = option.textContent = shown(choice);
      return option;
    }));
  } else {
    input = document.createElement("input");
    input.type = "text";
    input.autocomplete = "off";
    input.spellcheck = false;
    if (prop.type === "integer") input.inputMode = "numeric";
    else if (prop.type === "number") input.inputMode = "decimal";
    if (hasDefault) input.placeholder = shown(prop.default);
  }
  input.id = id;
  input.name = name;
  input.dataset.param = name;
  input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
  input.value = paramValues.get(name) || "";
  input.addEventListener(choices ? "change" : "input", () => {
    setFieldError(id, "");
    if (name === FACE_POINT) stage.setFacePointFromText(input.value);
    if (name === SEGMENTS) stage.setSegmentsFromText(input.value);
  });

  const range = [prop.minimum, prop.maximum].every((v) => typeof v === "number")
    ? ` From ${prop.minimum} to ${prop.maximum}.` : "";
  const description = `${prop.description || ""}${range}`.trim();
  label.title = input.title = description; // the whole description on hover
  const about = document.createElement("details");
  about.className = "about";
  const summary = document.createElement("summary");
  summary.textContent = "?";
  summary.setAttribute("aria-label", `About ${name}`);
  const help = document.createElement("p");
  help.id = `${id}-help`;
  help.className = "hint";
  help.textContent = description;
  about.append(summary, help);
  const error = document.createElement("p");
  error.id = `${id}-error`;
  error.className = "field-error";
  error.setAttribute("aria-live", "assertive");
  field.append(label, input, about, error);
  return field;
}

/** What a segment may name as its face, from the schema's Segment item (the speakers' fields). */
function segmentSpeakerChoices() {
  const defs = (paramSchema && paramSchema.$defs) || {};
  const segmentsProp = paramSchema && paramSchema.properties && paramSchema.properties[SEGMENTS];
  const item = segmentsProp ? resolveProp(segmentsProp, defs).items : null;
  const props = (item ? resolveProp(item, defs).properties : null) || {};
  const faces = [];
  if (props.face) {
    const face = resolveProp(props.face, defs);
    for (const option of [face, ...(face.anyOf || face.oneOf || [])]) {
      if (Array.isArray(option.enum)) faces.push(...option.enum.filter((v) => !faces.includes(v)));
    }
  }
  return { faces, point: Boolean(props[FACE_POINT]) };
}

// ------------------------------------------------------------------ file fields, drag and drop

function formatBytes(n) {
  if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
  if (n >= 1024) return `${Math.round(n / 1024)} KB`;
  return `${n} bytes`;
}

function showFileInfo(kind) {
  const file = $(kind).files[0];
  $(`${kind}-info`).textContent = file ? `${file.name} · ${formatBytes(file.size)}` : "";
  setFieldError(kind, "");
  if (kind === "video") {
    stage.load(file || null);
    if (file) { // a new video: a point or segments chosen on another one mean nothing here
      setParamValue(FACE_POINT, "");
      setParamValue(SEGMENTS, "");
    }
  }
}

function putFile(kind, file) {
  const dt = new DataTransfer();
  dt.items.add(file);
  $(kind).files = dt.files;
  showFileInfo(kind);
}

for (const kind of ["video", "audio"]) {
  const zone = $(`${kind}-drop`);
  $(kind).addEventListener("change", () => showFileInfo(kind));
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    e.stopPropagation();
    e.dataTransfer.dropEffect = "copy";
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) putFile(kind, file);
  });
}

// Dropped elsewhere on the page: sort by type instead of letting the browser open the file.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  for (const file of e.dataTransfer.files) {
    if (file.type.startsWith("video/")) putFile("video", file);
    else if (file.type.startsWith("audio/")) putFile("audio", file);
  }
});

// ------------------------------------------------------------------ submitting

/** The multipart form of generate (and preview): the files and every parameter given; null (with
 * the fields' errors shown) when a file is missing. */
function buildForm() {
  clearFormErrors();
  $("preview-error").textContent = "";
  // With an avatar_id the prepared avatar is the video: only the audio is uploaded.
  const avatar = $(paramId("avatar_id"));
  const byAvatar = Boolean(avatar && avatar.value.trim());
  const files = { video: byAvatar ? null : $("video").files[0], audio: $("audio").files[0] };
  const missing = ["video", "audio"].filter((k) => !files[k] && !(k === "video" && byAvatar));
  for (const k of missing) {
    setFieldError(k, k === "video" ? "Choose a video file, or give an avatar_id." : "Choose an audio file.");
  }
  if (missing.length) {
    $(missing[0]).focus();
    return null;
  }
  const form = new FormData();
  for (const el of $("params").querySelectorAll("[data-param]")) {
    const value = el.value.trim(); // empty: not sent, the service's default applies
    if (value) form.append(el.dataset.param, value);
  }
  if (files.video) form.append("video", files.video, files.video.name);
  form.append("audio", files.audio, files.audio.name);
  return { form, files };
}

$("job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const built = buildForm();
  if (!built) return;
  const { form, files } = built;
  const previews = files.video ? files : null; // by avatar: the service plays the inputs back

  const button = $("submit");
  button.disabled = true;
  button.textContent = "Uploading…";
  const previous = current;
  showJob(null, previews);
  try {
    const accepted = await uploadJob(form, (fraction) => showUpload(fraction));
    track(accepted.job_id, previews);
    refreshJobs();
  } catch (err) {
    if (current && current.id === null) closeJob();
    if (previous && previous.id) track(previous.id, previous.files);
    showApiError(err, files);
  } finally {
    button.disabled = false;
    button.textContent = "Generate";
  }
});

// ------------------------------------------------------------------ preview

let previewUrl = null;

/** "start=1.0;end=2.0" -> [1, 2]; null when absent or malformed. */
function previewRange(header) {
  const m = /start=([\d.]+)\s*;\s*end=([\d.]+)/.exec(header || "");
  return m ? [Number(m[1]), Number(m[2])] : null;
}

$("preview").addEventListener("click", async () => {
  const built = buildForm();
  if (!built) return;
  const { form, files } = built;
  const at = stage.at();
  if (at !== null) form.append("at", String(at));
  const button = $("preview");
  button.disabled = true;
  $("preview-state").textContent = "Rendering a preview…";
  let res;
  try {
    res = await fetch(`${API}/preview`, {
      method: "POST", body: form, headers: { Accept: "video/mp4", ...authHeaders() }, cache: "no-store",
    });
    if (!res.ok) throw new ApiError(res.status, await readJson(res), res.headers.get("Retry-After"));
    const blob = await res.blob();
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(blob);
  } catch (err) {
    $("preview-state").textContent = "";
    const e = err instanceof ApiError ? err : new ApiError(0, { error: "Cannot reach the service (network error)" });
    if (errorField(e, files) === "top") $("preview-error").textContent = `No preview: ${e.message}`;
    else showApiError(e, files);
    return;
  } finally {
    button.disabled = false;
  }
  $("preview-box").hidden = false;
  $("preview-video").src = previewUrl;
  const range = previewRange(res.headers.get("X-Lip-Sync-Preview"));
  const note = range ? `Preview of ${range[0].toFixed(2)}–${range[1].toFixed(2)} s.` : "Preview.";
  $("preview-note").textContent = note;
  $("preview-state").textContent = "";
  try {
    const faces = JSON.parse(res.headers.get("X-Lip-Sync-Faces") || "null");
    if (faces && stage.isShowing(files.video)) stage.showTracks(faces, form.get("segments") || "null");
  } catch {
    // no face summary: the boxes stay as they were
  }
  announce(`${note} The face tracks are marked on the first frame.`);
});

// ------------------------------------------------------------------ the job panel

let current = null; // {id, files, timer, resultUrl, inputUrls, finished, lastStatus, liveAttached}

function humanStage(stage) {
  return (stage || "").replace(/[_-]+/g, " ");
}

function setProgress(value) {
  $("job-progress").value = Math.max(0, Math.min(1, value || 0));
}

function setStatus(text) {
  $("job-status").textContent = text;
}

/** Show the job panel for a job (id null: still uploading), with the input previews when we have the files. */
function showJob(id, files) {
  closeJob();
  current = { id, files: files || null, timer: null, resultUrl: null, inputUrls: [], finished: false, lastStatus: null,
    liveAttached: false };
  const panel = $("job");
  panel.hidden = false;
  panel.dataset.status = id ? "" : "uploading";
  $("job-id").textContent = id || "(uploading)";
  $("job-error").textContent = "";
  $("cancel").hidden = true;
  $("download").hidden = true;
  $("result-video").hidden = true;
  $("live-video").hidden = $("live-note").hidden = true;
  $("result-note").hidden = false;
  setProgress(0);
  setStatus(id ? "Loading the job…" : "Uploading…");

  const inputVideo = $("input-video");
  const inputAudio = $("input-audio");
  $("input-note").hidden = true;
  if (files) {
    const v = URL.createObjectURL(files.video);
    const a = URL.createObjectURL(files.audio);
    current.inputUrls.push(v, a);
    inputVideo.src = v;
    inputAudio.src = a;
  } else if (id) {
    loadInputs(current); // after a reload, or a job from the list: the service keeps its inputs
  }
  inputVideo.hidden = inputAudio.hidden = !files;
}

/** A URL for a media route: the route itself (streamed, seekable), or a blob when a token must be sent. */
async function mediaUrl(path) {
  if (!token()) return API + path;
  const res = await api("GET", path); // <video src> cannot carry the Authorization header
  return URL.createObjectURL(await res.blob());
}

function inputsGone(job, err) {
  if (current !== job) return;
  if (err && err.status === 401) showTokenError(err.message);
  $("input-video").hidden = $("input-audio").hidden = true;
  const note = $("input-note");
  note.textContent = err && err.status !== 404 && err.status !== 401
    ? `The inputs could not be loaded: ${err.message}` : "The inputs of this job are not available.";
  note.hidden = false;
}

async function loadInputs(job) {
  const base = `/jobs/${encodeURIComponent(job.id)}/inputs`;
  let urls;
  try {
    urls = await Promise.all([mediaUrl(`${base}/video`), mediaUrl(`${base}/audio`)]);
  } catch (err) {
    inputsGone(job, err);
    return;
  }
  if (current !== job) {
    for (const url of urls) if (url.startsWith("blob:")) URL.revokeObjectURL(url);
    return;
  }
  job.inputUrls.push(...urls.filter((url) => url.startsWith("blob:")));
  for (const [elementId, url] of [["input-video", urls[0]], ["input-audio", urls[1]]]) {
    const media = $(elementId);
    media.addEventListener("error", () => { if (media.getAttribute("src") === url) inputsGone(job, null); },
      { once: true });
    media.src = url;
    media.hidden = false;
  }
}

function closeJob() {
  if (!current) return;
  clearTimeout(current.timer);
  stopLive(current);
  for (const url of [current.resultUrl, ...current.inputUrls]) if (url) URL.revokeObjectURL(url);
  for (const id of ["input-video", "input-audio", "result-video", "live-video"]) {
    const media = $(id);
    media.removeAttribute("src");
    media.load();
  }
  $("download").removeAttribute("href");
  current = null;
  $("job").hidden = true;
  sessionStorage.removeItem(JOB_KEY);
}

function showUpload(fraction) {
  setProgress(fraction);
  setStatus(`Uploading… ${Math.round(fraction * 100)}%`);
}

function track(id, files) {
  showJob(id, files);
  sessionStorage.setItem(JOB_KEY, id);
  markCurrentRow();
  poll(current);
}

async function poll(job) {
  job.timer = null;
  let st;
  try {
    const res = await api("GET", `/status/${encodeURIComponent(job.id)}`);
    st = await res.json();
  } catch (err) {
    if (current !== job) return;
    if (err.status === 401) {
      setStatus("Waiting for a valid API token…");
      showTokenError(err.message);
    } else if (err.status === 404) {
      job.finished = true;
      setStatus("This job no longer exists.");
      sessionStorage.removeItem(JOB_KEY);
    } else {
      setStatus(`Status unavailable, retrying… (${err.message})`);
      job.timer = setTimeout(() => poll(job), 2000);
    }
    return;
  }
  if (current !== job) return;
  renderStatus(st);
  showProgressive(job, st);
  if (st.faces && job.files && stage.isShowing(job.files.video)) stage.showTracks(st.faces);
  if (st.status !== job.lastStatus) {
    job.lastStatus = st.status;
    refreshJobs();
  }
  if (st.status === "completed") {
    job.finished = true;
    await loadResult(job, st);
  } else if (FINISHED.has(st.status)) {
    job.finished = true;
  } else {
    job.timer = setTimeout(() => poll(job), POLL_MS);
  }
}

function renderStatus(st) {
  $("job").dataset.status = st.status;
  $("cancel").hidden = FINISHED.has(st.status);
  setProgress(st.status === "completed" ? 1 : st.progress);
  const pct = `${Math.round((st.status === "completed" ? 1 : st.progress || 0) * 100)}%`;
  if (st.status === "queued") setStatus(`Queued · waiting for a worker${queueText(st)}`);
  else if (st.status === "processing") setStatus(`Processing · ${humanStage(st.stage)} · ${pct}${queueText(st)}`);
  else if (st.status === "completed") {
    const secs = st.timings && st.timings.total;
    setStatus(`Completed${secs ? ` in ${secs.toFixed(1)} s` : ""}${st.frames ? ` · ${st.frames} frames` : ""}`);
  } else setStatus(`${st.status[0].toUpperCase()}${st.status.slice(1)}`);
  $("job-error").textContent = st.status === "failed" && st.error ? `The job failed: ${st.error}` : "";
}

/** A running job's playable part: progressive.js (window.LipSyncProgressive) plays status.progressive's
 * playlist in #live-video until the MP4 is in; "playable: N s" says how far it goes. */
function showProgressive(job, st) {
  const live = st.progressive;
  const running = !FINISHED.has(st.status) && live && typeof live.playlist === "string";
  $("live-video").hidden = $("live-note").hidden = !running;
  if (!running) {
    stopLive(job);
    return;
  }
  const playable = Number(live.playable_seconds) || 0;
  $("live-note").textContent = `playable: ${playable.toFixed(1)} s${live.ended ? " (all of it)" : ""}`;
  const player = window.LipSyncProgressive;
  if (!job.liveAttached && player && typeof player.attach === "function") {
    job.liveAttached = true; // once per job; until the script is there, the next poll tries again
    job.live = player.attach($("live-video"), new URL(live.playlist, document.baseURI).href, token()) || null;
  }
}

/** " · 3rd in line · about 2 min left" from the status's queue_position and eta_s (either may be null). */
function queueText(st) {
  let text = "";
  if (st.status === "queued" && Number.isInteger(st.queue_position)) {
    text += st.queue_position === 1 ? " · next in line" : ` · ${st.queue_position} in line`;
  }
  if (typeof st.eta_s === "number" && Number.isFinite(st.eta_s)) {
    const s = Math.max(1, Math.round(st.eta_s));
    text += ` · about ${s < 90 ? `${s} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`} left`;
  }
  return text;
}

function stopLive(job) {
  if (job.live && typeof job.live.detach === "function") job.live.detach();
  job.live = null;
}

/** Fetch the MP4 with the auth header, and use one blob URL for the player and the download link. */
async function loadResult(job, st) {
  let blob;
  try {
    const res = await api("GET", `/download/${encodeURIComponent(job.id)}`);
    blob = await res.blob();
  } catch (err) {
    if (current !== job) return;
    if (err.status === 401) showTokenError(err.message);
    $("job-error").textContent = `The result could not be fetched: ${err.message}`;
    return;
  }
  if (current !== job) return;
  const name = st.output_path || `lip_sync_${job.id}.mp4`;
  const ext = (/\.(\w+)$/.exec(name) || [null, "mp4"])[1].toLowerCase();
  if (!blob.type.startsWith("video/")) blob = new Blob([blob], { type: `video/${ext}` });
  job.resultUrl = URL.createObjectURL(blob);
  stopLive(job);
  const video = $("result-video");
  video.src = job.resultUrl;
  video.hidden = false;
  $("result-note").hidden = true;
  const link = $("download");
  link.href = job.resultUrl;
  link.download = name;
  link.textContent = `Download ${ext.toUpperCase()} (${formatBytes(blob.size)})`;
  link.hidden = false;
  announce("The lip-synced video is ready.");
}

$("cancel").addEventListener("click", async () => {
  const job = current;
  if (!job || !job.id) return;
  try {
    await api("POST", `/cancel/${encodeURIComponent(job.id)}`);
    announce("Job cancelled.");
  } catch (err) {
    if (err.status === 401) showTokenError(err.message);
    else $("job-error").textContent = err.message;
  }
  if (current === job && !job.timer) poll(job);
});

// ------------------------------------------------------------------ recent jobs

function localTime(stamp) {
  if (!stamp) return "";
  // ISO 8601; a stamp without a zone is UTC (the seed's format)
  const d = new Date(/(Z|[+-]\d\d:?\d\d)$/i.test(stamp) ? stamp : `${stamp}Z`);
  return Number.isNaN(d.getTime()) ? stamp : d.toLocaleString();
}

function seconds(value) {
  return typeof value === "number" && Number.isFinite(value) ? ` · ${value.toFixed(1)} s` : "";
}

/** "face.mp4 · 4.0 s + speech.wav · 5.0 s" from a job's `inputs` (names and durations). */
function inputsLine(job) {
  const inputs = job.inputs || {};
  const parts = [["video_filename", "video_duration_s"], ["audio_filename", "audio_duration_s"]]
    .filter(([name]) => inputs[name])
    .map(([name, duration]) => `${inputs[name]}${seconds(inputs[duration])}`);
  return parts.join(" + ");
}

const thumbs = new Map(); // job id -> a promise of its thumbnail's URL

function thumbnail(jobId) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "";
  img.width = 96;
  img.height = 54;
  img.hidden = true;
  if (!thumbs.has(jobId)) thumbs.set(jobId, mediaUrl(`/jobs/${encodeURIComponent(jobId)}/thumbnail.jpg`));
  thumbs.get(jobId).then((url) => {
    img.addEventListener("load", () => { img.hidden = false; }, { once: true });
    img.addEventListener("error", () => thumbs.delete(jobId), { once: true }); // none yet: ask again next time
    img.src = url;
  }, () => thumbs.delete(jobId));
  return img;
}

function forgetThumbnail(jobId) {
  const url = thumbs.get(jobId);
  thumbs.delete(jobId);
  if (url) url.then((u) => { if (u.startsWith("blob:")) URL.revokeObjectURL(u); }, () => {});
}

function button(text, label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function renderJobs(jobs) {
  const list = $("jobs");
  list.replaceChildren();
  $("jobs-empty").hidden = jobs.length > 0;
  for (const job of jobs) {
    const li = document.createElement("li");
    li.dataset.jobId = job.job_id;

    const main = document.createElement("div");
    main.className = "job-main";
    const inputs = document.createElement("span");
    inputs.className = "job-inputs";
    inputs.textContent = inputsLine(job);
    const id = document.createElement("code");
    id.textContent = job.job_id;
    const when = document.createElement("span");
    when.className = "job-when";
    when.textContent = `created ${localTime(job.created_at)}`;
    main.append(...(inputs.textContent ? [inputs] : []), id, when);

    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.status = job.status;
    badge.textContent = job.status === "processing"
      ? `processing · ${humanStage(job.stage)} ${Math.round(job.progress * 100)}%`
      : job.status;

    const short = job.job_id.slice(0, 8);
    const buttons = document.createElement("div");
    buttons.className = "job-buttons";
    buttons.append(
      button("Show", `Show job ${short}`, "secondary small", () => {
        const files = current && current.id === job.job_id ? current.files : null;
        track(job.job_id, files);
        $("job-heading").focus();
      }),
      button("Clean up", `Clean up job ${short}`, "danger small", (e) => cleanup(job.job_id, e.currentTarget)),
    );
    li.append(thumbnail(job.job_id), main, badge, buttons);
    list.append(li);
  }
  markCurrentRow();
}

function markCurrentRow() {
  for (const li of $("jobs").children) li.classList.toggle("current", Boolean(current && li.dataset.jobId === current.id));
}

let jobsRequest = 0;

/** Reload the list; true when it worked. */
async function refreshJobs() {
  const n = ++jobsRequest;
  try {
    const res = await api("GET", "/jobs?limit=20");
    const body = await res.json();
    if (n !== jobsRequest) return true;
    $("jobs-error").textContent = "";
    if (/token/i.test($("token-error").textContent)) setFieldError("token", "");
    renderJobs(body.jobs || []);
    return true;
  } catch (err) {
    if (n !== jobsRequest) return false;
    if (err.status === 401) {
      showTokenError(err.message);
      $("jobs-error").textContent = "Enter a valid API token to see the jobs.";
      renderJobs([]);
      $("jobs-empty").hidden = true;
    } else {
      $("jobs-error").textContent = `The job list could not be loaded: ${err.message}`;
    }
    return false;
  }
}

async function cleanup(id, btn) {
  btn.disabled = true;
  try {
    await api("DELETE", `/cleanup/${encodeURIComponent(id)}`);
    forgetThumbnail(id);
    if (current && current.id === id) closeJob();
    announce(`Job ${id.slice(0, 8)} cleaned up.`);
  } catch (err) {
    btn.disabled = false;
    if (err.status === 401) showTokenError(err.message);
    else $("jobs-error").textContent = `Job ${id.slice(0, 8)} could not be cleaned up: ${err.message}`;
    return;
  }
  await refreshJobs();
  $("jobs-heading").focus(); // the row (and its focused button) is gone
}

$("jobs-refresh").addEventListener("click", () => refreshJobs());

// ------------------------------------------------------------------ start

const stage = createStage({
  announce,
  onChange({ facePoint, segments }) {
    setParamValue(FACE_POINT, facePoint);
    setParamValue(SEGMENTS, segments ? JSON.stringify(segments) : "");
    if (facePoint) setParamValue("face", ""); // face_point is instead of face
  },
});

$("token").value = token();
showTokenState();
checkHealth();
loadParams();
refreshJobs();
const resume = sessionStorage.getItem(JOB_KEY);
if (resume) track(resume, null);
