// Live sessions in the browser: speech from the microphone or a file, streamed to
// WS /api/lip-sync/live as 16 kHz mono PCM s16le; the talking avatar that comes back
// (fragmented MP4) plays through Media Source Extensions as it arrives.
//
// Browsers cannot set headers on a WebSocket: the token travels as the subprotocol
// "bearer.<token>" next to "lipsync.live" (never in the URL). The token is shared with the
// jobs page (sessionStorage, this tab only).

const API = new URL(document.querySelector('meta[name="lipsync-api"]').content + "/", location.href);
const TOKEN_KEY = "lipsync.token";
const RATE = 16000;
const $ = (id) => document.getElementById(id);

let session = null; // {ws, audio, media, stop()}

function token() {
  return $("live-token").value.trim() || sessionStorage.getItem(TOKEN_KEY) || "";
}

function status(text) {
  $("live-status").textContent = text;
}

function showError(text) {
  const box = $("live-error");
  box.textContent = text;
  box.hidden = !text;
}

async function loadAvatars() {
  const t = token();
  const res = await fetch(new URL("avatars", API), { headers: t ? { Authorization: `Bearer ${t}` } : {} });
  const select = $("live-avatar");
  select.replaceChildren();
  if (!res.ok) {
    showError(res.status === 401 ? "Enter a valid API token." : `Cannot list avatars (${res.status}).`);
    return;
  }
  showError("");
  const ready = (await res.json()).avatars.filter((a) => a.ready);
  for (const a of ready) {
    const option = document.createElement("option");
    option.value = a.avatar_id;
    option.textContent = `${a.video?.filename || a.avatar_id} (${a.avatar_id.slice(0, 8)})`;
    select.append(option);
  }
  if (!ready.length) status("No ready avatar: create one on the jobs page (or with lipsync avatar create).");
}

/** A MediaSource fed in order: appendBuffer one message at a time. */
function player(video, mime) {
  const ms = new MediaSource();
  const queue = [];
  let buffer = null;
  let ended = false;
  video.src = URL.createObjectURL(ms);
  const pump = () => {
    if (!buffer || buffer.updating) return;
    if (queue.length) buffer.appendBuffer(queue.shift());
    else if (ended && ms.readyState === "open") ms.endOfStream();
  };
  ms.addEventListener("sourceopen", () => {
    buffer = ms.addSourceBuffer(mime);
    buffer.addEventListener("updateend", pump);
    pump();
  });
  return {
    append(data) { queue.push(data); pump(); },
    end() { ended = true; pump(); },
  };
}

/** Float32 samples -> s16le bytes. */
function pcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) out[i] = Math.max(-1, Math.min(1, samples[i])) * 0x7fff;
  return out.buffer;
}

async function speech(context, source) {
  if (source === "file") {
    const file = $("live-file").files[0];
    if (!file) throw new Error("Choose a speech file.");
    const decoded = await context.decodeAudioData(await file.arrayBuffer());
    const node = new AudioBufferSourceNode(context, { buffer: decoded });
    return { node, start: () => node.start(), stop: () => node.stop(), file: true };
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  const node = new MediaStreamAudioSourceNode(context, { mediaStream: stream });
  return { node, start() {}, stop: () => stream.getTracks().forEach((t) => t.stop()), file: false };
}

async function start(event) {
  event.preventDefault();
  if (session) return;
  showError("");
  const avatar = $("live-avatar").value;
  if (!avatar) return showError("Pick an avatar.");
  const t = token();
  if ($("live-token").value.trim()) sessionStorage.setItem(TOKEN_KEY, t);
  const url = new URL(`live?avatar_id=${encodeURIComponent(avatar)}`, API);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const context = new AudioContext({ sampleRate: RATE });
  await context.audioWorklet.addModule("live-capture.js");
  const capture = new AudioWorkletNode(context, "lipsync-capture");
  let input;
  try {
    input = await speech(context, document.querySelector('input[name="live-source"]:checked').value);
  } catch (err) {
    context.close();
    return showError(err.message);
  }
  const ws = new WebSocket(url, t ? ["lipsync.live", `bearer.${t}`] : ["lipsync.live"]);
  ws.binaryType = "arraybuffer";
  let media = null;
  let ended = false;
  const stopInput = () => {
    if (ended) return;
    ended = true;
    input.stop();
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
  };
  session = { ws, stop: stopInput };
  $("live-start").disabled = true;
  $("live-stop").disabled = false;
  status("Connecting…");
  capture.port.onmessage = (e) => {
    if (!ended && ws.readyState === WebSocket.OPEN) ws.send(pcm16(e.data));
  };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") {
      media?.append(e.data);
      return;
    }
    const message = JSON.parse(e.data);
    if (message.type === "ready") {
      media = player($("live-video"), message.mime);
      $("live-video").play().catch(() => {});
      input.node.connect(capture);
      // the capture hands over its last blocks a moment after the file ends
      if (input.file) input.node.onended = () => setTimeout(stopInput, 250);
      input.start();
      status(`Live: ${message.width}x${message.height} at ${message.fps} fps.`);
    } else if (message.type === "dropped") {
      status(`Live: ${message.total} frames dropped so far (the connection is too slow).`);
    } else if (message.type === "end") {
      media?.end();
      status(`Ended: ${message.frames} frames (${message.idle_frames} idle, ${message.dropped} dropped).`);
      $("live-status").dataset.frames = message.frames;
    }
  };
  ws.onclose = (e) => {
    if (e.code !== 1000) showError(`The session closed: ${e.reason || e.code}`);
    ended = true;
    input.stop();
    context.close();
    session = null;
    $("live-start").disabled = false;
    $("live-stop").disabled = true;
  };
}

$("live-token").value = sessionStorage.getItem(TOKEN_KEY) || "";
$("live-form").addEventListener("submit", start);
$("live-stop").addEventListener("click", () => session?.stop());
$("live-refresh").addEventListener("click", loadAvatars);

/** List the avatars at once, unless the service wants a token and none is known yet (health says so). */
async function init() {
  const health = await fetch(new URL("health", API)).then((r) => r.json()).catch(() => ({}));
  const needsToken = health.auth === true || health.auth?.enabled === true;
  if (needsToken && !token()) status("Enter your API token, then Refresh the avatars.");
  else loadAvatars();
}
init();
