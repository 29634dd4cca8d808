// The chosen video, drawn here from the local file (nothing is uploaded until Preview or Generate):
//
//   - its first frame in a canvas: a click on a face gives that face's point in the video's pixels
//     (the job's `face_point`, or the selected segment's own face), shown with a marker; the face
//     tracks of a preview or a finished job (`faces.tracks[]`) are drawn on it as labelled boxes;
//   - a strip of thumbnails (drawn by seeking a <video> that is never shown): drag on it to make a
//     segment [start, end] in seconds; a click or the arrow keys move the cursor (the preview's `at`).
//
// The stage holds the segments and the point; app.js sends them as the `face_point` and `segments`
// parameters and tells the stage when those fields are typed into.

const THUMBS = 10;
const THUMB_WIDTH = 160;
const MIN_SEGMENT_S = 0.04; // one frame at 25 fps
const DRAG_PX = 4; // less than this between press and release: a click, not a segment

const $ = (id) => document.getElementById(id);
const round2 = (t) => Math.round(t * 100) / 100;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/** One <video> element, never shown, that draws frames of a local file on request, one seek at a time. */
class FrameGrabber {
  constructor(file) {
    this.url = URL.createObjectURL(file);
    this.video = document.createElement("video");
    this.video.muted = true;
    this.video.preload = "auto";
    this.video.playsInline = true;
    this.ready = new Promise((resolve, reject) => {
      this.video.addEventListener("loadeddata", resolve, { once: true });
      this.video.addEventListener("error", () => reject(new Error("this browser cannot play the video")),
        { once: true });
    });
    this.video.src = this.url;
    this.queue = this.ready;
  }

  /** Draw the frame at `t` seconds into `canvas` (sized `width` px wide, or the video's own size). */
  draw(t, canvas, width = 0) {
    const job = this.queue.then(async () => {
      const v = this.video;
      if (Math.abs(v.currentTime - t) > 1e-3 || v.readyState < 2) {
        const seeked = new Promise((resolve) => v.addEventListener("seeked", resolve, { once: true }));
        v.currentTime = t;
        await seeked;
      }
      canvas.width = width || v.videoWidth;
      canvas.height = Math.round(canvas.width * v.videoHeight / v.videoWidth);
      canvas.getContext("2d").drawImage(v, 0, 0, canvas.width, canvas.height);
    });
    this.queue = job.catch(() => {});
    return job;
  }

  close() {
    this.video.removeAttribute("src");
    this.video.load();
    URL.revokeObjectURL(this.url);
  }
}

/**
 * The stage. `onChange({facePoint, segments})` is called after each edit made here: facePoint is
 * "x,y" or "" and segments the list to send, or null when there are none.
 */
export function createStage({ onChange, announce }) {
  const stage = $("stage");
  const canvas = $("frame");
  const frameBox = $("frame-box");
  const marks = $("frame-marks");
  const strip = $("strip");

  let grabber = null;
  let file = null;
  let generation = 0;
  let size = null; // {width, height} of the video, px
  let duration = 0;
  let point = null; // the job's face point [x, y]
  let segments = []; // {start, end, speaker: "" | "point" | a face value as text, point: [x, y] | null, extra}
  let selected = null; // a segment of `segments`
  let cursor = 0;
  let cursorSet = false; // the user moved it (else the service picks the preview's stretch)
  let tracks = null; // the last face summary shown: {tracks, chosen, segments?: [{segment, chosen}]}
  let tracksSent = null; // the segments (as sent) that summary's per-segment choices belong to
  let speakerChoices = { faces: [], point: false }; // what a segment may name (from the schema)

  // ---------------------------------------------------------------- loading a video

  async function load(newFile) {
    if (newFile === file) return;
    const n = ++generation;
    if (grabber) grabber.close();
    grabber = null;
    file = newFile;
    size = null;
    duration = 0;
    tracks = null;
    setPoint(null, false);
    segments = [];
    selected = null;
    cursor = 0;
    cursorSet = false;
    $("thumbs").replaceChildren();
    $("preview-box").hidden = true;
    $("preview-error").textContent = "";
    render();
    stage.hidden = !file;
    if (!file) return;
    grabber = new FrameGrabber(file);
    try {
      await grabber.ready;
    } catch (err) {
      if (n !== generation) return;
      $("face-choice").textContent = `The first frame cannot be shown: ${err.message}. Jobs still work.`;
      return;
    }
    if (n !== generation) return;
    const v = grabber.video;
    size = { width: v.videoWidth, height: v.videoHeight };
    duration = Number.isFinite(v.duration) ? v.duration : 0;
    strip.setAttribute("aria-valuemax", round2(duration));
    await grabber.draw(0, canvas);
    if (n !== generation) return;
    stage.dataset.ready = "frame";
    render();
    const thumbs = [];
    for (let i = 0; i < THUMBS; i += 1) {
      const thumb = document.createElement("canvas");
      thumb.className = "thumb-frame";
      $("thumbs").append(thumb);
      thumbs.push(thumb);
    }
    for (const [i, thumb] of thumbs.entries()) {
      const t = Math.min((i + 0.5) * duration / THUMBS, Math.max(0, duration - 0.01));
      await grabber.draw(t, thumb, THUMB_WIDTH).catch(() => {});
      if (n !== generation) return;
    }
    stage.dataset.ready = "strip"; // every thumbnail drawn
  }

  // ---------------------------------------------------------------- choosing a face

  /** Video pixels under a click on the frame (a keyboard press on a track box: that box's centre). */
  function framePoint(e) {
    const box = e.target.closest(".track-box");
    if (box && e.detail === 0) return box.dataset.center.split(",").map(Number);
    const rect = canvas.getBoundingClientRect();
    return [
      Math.round(clamp((e.clientX - rect.left) / rect.width, 0, 1) * (size.width - 1)),
      Math.round(clamp((e.clientY - rect.top) / rect.height, 0, 1) * (size.height - 1)),
    ];
  }

  frameBox.addEventListener("click", (e) => {
    if (!size) return;
    const [x, y] = framePoint(e);
    if (selected && speakerChoices.point) {
      selected.speaker = "point";
      selected.point = [x, y];
      announce(`Segment ${segments.indexOf(selected) + 1} dubs the face at ${x}, ${y}.`);
      render();
      changed();
    } else {
      setPoint([x, y]);
      announce(`The face at ${x}, ${y} will be dubbed.`);
    }
  });

  $("face-clear").addEventListener("click", () => {
    setPoint(null);
    announce("No face chosen: the service picks one.");
  });

  function setPoint(p, notify = true) {
    point = p;
    render();
    if (notify) changed();
  }

  function pointText(p) {
    return p ? `${p[0]},${p[1]}` : "";
  }

  /** "x,y" (or "x;y", "x y") as face_point accepts it; null when it does not parse. */
  function parsePoint(text) {
    const m = /^\s*(\d+(?:\.\d*)?)\s*[,; ]\s*(\d+(?:\.\d*)?)\s*$/.exec(text || "");
    return m ? [Math.round(Number(m[1])), Math.round(Number(m[2]))] : null;
  }

  /** A face summary (a preview's or a job's); `sent`: the segments value it was made for, when known,
   * so that who each segment dubbed is shown while the segments stay as they were. */
  function showTracks(faces, sent = null) {
    tracks = faces && Array.isArray(faces.tracks) ? faces : null;
    tracksSent = sent;
    render();
  }

  /** Who a segment dubbed in the last preview (its summary's `segments`), while they are unchanged. */
  function dubbedIn(index) {
    if (!tracks || !Array.isArray(tracks.segments) || tracksSent !== JSON.stringify(sentSegments())) return null;
    const entry = tracks.segments.find((e) => e.segment === index);
    return entry && Array.isArray(entry.chosen) ? entry.chosen : null;
  }

  // ---------------------------------------------------------------- the strip

  function timeAt(clientX) {
    const rect = strip.getBoundingClientRect();
    return clamp((clientX - rect.left) / rect.width, 0, 1) * duration;
  }

  function setCursor(t) {
    cursor = round2(clamp(t, 0, duration));
    cursorSet = true;
    render();
  }

  /** A new segment [a, b], cut where it runs into another (segments are ordered and never overlap). */
  function addSegment(a, b) {
    let start = round2(clamp(Math.min(a, b), 0, duration));
    let end = round2(clamp(Math.max(a, b), 0, duration));
    for (const s of segments) {
      if (start < s.end && end > s.start) {
        if (s.start <= start) start = s.end;
        else end = Math.min(end, s.start);
      }
    }
    if (end - start < MIN_SEGMENT_S) {
      announce("There is no room for a segment there.");
      return null;
    }
    const segment = { start, end, speaker: "", point: null, extra: {} };
    segments.push(segment);
    segments.sort((x, y) => x.start - y.start);
    selected = speakerChoices.point || speakerChoices.faces.length ? segment : null;
    announce(`Segment ${segments.indexOf(segment) + 1}: ${start.toFixed(2)} to ${end.toFixed(2)} s.`);
    render();
    changed();
    return segment;
  }

  let drag = null;
  strip.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !duration) return;
    drag = { x0: e.clientX, t0: timeAt(e.clientX), moved: false };
    strip.setPointerCapture(e.pointerId);
    strip.focus();
    e.preventDefault();
  });
  strip.addEventListener("pointermove", (e) => {
    if (!drag) return;
    if (Math.abs(e.clientX - drag.x0) >= DRAG_PX) drag.moved = true;
    if (!drag.moved) return;
    const t = timeAt(e.clientX);
    placeBand($("strip-draft"), Math.min(drag.t0, t), Math.max(drag.t0, t));
    $("strip-draft").hidden = false;
  });
  const endDrag = (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    $("strip-draft").hidden = true;
    if (e.type === "pointercancel") return;
    const t = timeAt(e.clientX);
    if (d.moved) {
      addSegment(d.t0, t);
    } else {
      selected = segments.find((s) => t >= s.start && t < s.end) || null;
      setCursor(t);
    }
  };
  strip.addEventListener("pointerup", endDrag);
  strip.addEventListener("pointercancel", endDrag);

  strip.addEventListener("keydown", (e) => {
    if (!duration) return;
    const step = e.shiftKey ? 1 : 0.1;
    const keys = {
      ArrowLeft: () => setCursor(cursor - step),
      ArrowRight: () => setCursor(cursor + step),
      Home: () => setCursor(0),
      End: () => setCursor(duration),
      Enter: () => addSegment(cursor, Math.min(duration, cursor + 1)),
      Escape: () => { selected = null; render(); },
      Delete: () => selected && removeSegment(selected),
    };
    if (keys[e.key]) {
      e.preventDefault();
      keys[e.key]();
    }
  });

  $("segment-add").addEventListener("click", () => {
    if (duration) addSegment(cursor, Math.min(duration, cursor + 1));
  });

  function removeSegment(segment) {
    segments = segments.filter((s) => s !== segment);
    if (selected === segment) selected = null;
    render();
    changed();
    announce("Segment removed.");
  }

  function placeBand(el, start, end) {
    el.style.left = `${(start / duration) * 100}%`;
    el.style.width = `${((end - start) / duration) * 100}%`;
  }

  // ---------------------------------------------------------------- rendering

  function render() {
    renderMarks();
    renderStrip();
    renderSegmentList();
    const target = selected && speakerChoices.point
      ? `segment ${segments.indexOf(selected) + 1}'s speaker` : "the face to dub";
    $("frame-caption").textContent = `First frame: click ${target}`;
    $("face-choice").textContent = point
      ? `Dubbing the face at ${point[0]}, ${point[1]} (face_point). Click another face to change it.`
      : "No face chosen: the service picks one (the face option; default: the largest).";
    $("face-clear").hidden = !point;
  }

  function pct(value, total) {
    return `${(clamp(value, 0, total) / total) * 100}%`;
  }

  function marker(p, text, className) {
    const m = document.createElement("span");
    m.className = `marker ${className}`;
    m.textContent = text;
    m.dataset.point = pointText(p);
    m.style.left = pct(p[0], size.width);
    m.style.top = pct(p[1], size.height);
    return m;
  }

  function renderMarks() {
    marks.replaceChildren();
    if (!size) return;
    if (tracks) {
      const chosen = new Set(tracks.chosen || []);
      for (const t of tracks.tracks) {
        if (!Array.isArray(t.box) || t.box.length !== 4) continue;
        const [x1, y1, x2, y2] = t.box;
        const b = document.createElement("button");
        b.type = "button";
        b.className = "track-box";
        b.dataset.track = t.id;
        b.dataset.center = `${Math.round(clamp((x1 + x2) / 2, 0, size.width - 1))},${
          Math.round(clamp((y1 + y2) / 2, 0, size.height - 1))}`;
        b.classList.toggle("chosen", chosen.has(t.id));
        b.classList.toggle("label-inside", y1 < 0.08 * size.height); // no room above it in the frame
        const label = document.createElement("span"); // above the box: a small face stays visible
        label.className = "track-label";
        label.textContent = `Person ${t.id}${chosen.has(t.id) ? " · dubbed" : ""}`;
        b.append(label);
        b.setAttribute("aria-label", `Person ${t.id}${chosen.has(t.id) ? ", dubbed last time" : ""}: choose this face`);
        b.style.left = pct(x1, size.width);
        b.style.top = pct(y1, size.height);
        b.style.width = `calc(${pct(x2, size.width)} - ${pct(x1, size.width)})`;
        b.style.height = `calc(${pct(y2, size.height)} - ${pct(y1, size.height)})`;
        marks.append(b);
      }
    }
    if (point) marks.append(marker(point, "dub", "job"));
    segments.forEach((s, i) => {
      if (s.speaker === "point" && s.point) {
        marks.append(marker(s.point, `S${i + 1}`, `segment${s === selected ? " selected" : ""}`));
      }
    });
  }

  function renderStrip() {
    const box = $("strip-segments");
    box.replaceChildren();
    if (!duration) return;
    segments.forEach((s, i) => {
      const band = document.createElement("div");
      band.className = `strip-segment${s === selected ? " selected" : ""}`;
      band.textContent = `${i + 1}`;
      placeBand(band, s.start, s.end);
      box.append(band);
    });
    $("strip-cursor").style.left = pct(cursor, duration);
    strip.setAttribute("aria-valuenow", cursor);
    strip.setAttribute("aria-valuetext", `${cursor.toFixed(2)} s of ${duration.toFixed(2)} s`);
    $("cursor-time").textContent = `Cursor ${cursor.toFixed(2)} s of ${duration.toFixed(2)} s`;
  }

  function speakerOptions(segment) {
    const options = [["", "the job's face"]];
    for (const f of speakerChoices.faces) options.push([String(f), f === "speaker" ? "whoever speaks" : String(f)]);
    for (const t of (tracks && tracks.tracks) || []) options.push([String(t.id), `person ${t.id}`]);
    if (speakerChoices.point) {
      options.push(["point", segment.point ? `the face at ${pointText(segment.point)}` : "a face I click"]);
    }
    if (!options.some(([value]) => value === segment.speaker)) options.push([segment.speaker, segment.speaker]);
    return options;
  }

  function renderSegmentList() {
    const list = $("segments");
    list.replaceChildren();
    segments.forEach((s, i) => {
      const n = i + 1;
      const li = document.createElement("li");
      li.className = s === selected ? "selected" : "";
      li.dataset.index = i;
      const times = document.createElement("span");
      times.className = "segment-times";
      for (const key of ["start", "end"]) {
        const input = document.createElement("input");
        input.type = "number";
        input.step = "0.01";
        input.min = "0";
        input.max = String(round2(duration));
        input.value = s[key].toFixed(2);
        input.className = `segment-${key}`;
        input.setAttribute("aria-label", `Segment ${n} ${key} (s)`);
        input.addEventListener("change", () => {
          const v = Number(input.value);
          if (Number.isFinite(v)) s[key] = round2(clamp(v, 0, duration));
          segments.sort((x, y) => x.start - y.start);
          render();
          changed();
        });
        times.append(input);
        if (key === "start") times.append("–");
      }
      times.append(" s");
      li.append(times);
      if (speakerChoices.point || speakerChoices.faces.length) {
        const select = document.createElement("select");
        select.className = "segment-speaker";
        select.setAttribute("aria-label", `Segment ${n}: whose face`);
        for (const [value, text] of speakerOptions(s)) {
          const option = document.createElement("option");
          option.value = value;
          option.textContent = text;
          select.append(option);
        }
        select.value = s.speaker;
        select.addEventListener("change", () => {
          s.speaker = select.value;
          if (s.speaker === "point") {
            selected = s; // the next click on the frame sets it
            announce(`Click segment ${n}'s speaker on the frame.`);
          }
          render();
          changed();
        });
        li.append(select);
      }
      const pick = document.createElement("button");
      pick.type = "button";
      pick.className = "secondary small segment-select";
      pick.textContent = s === selected ? "Selected" : "Select";
      pick.setAttribute("aria-pressed", String(s === selected));
      pick.setAttribute("aria-label", `Select segment ${n}`);
      pick.addEventListener("click", () => {
        selected = selected === s ? null : s;
        render();
      });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "danger small segment-remove";
      remove.textContent = "Remove";
      remove.setAttribute("aria-label", `Remove segment ${n}`);
      remove.addEventListener("click", () => removeSegment(s));
      li.append(pick, remove);
      const who = dubbedIn(i);
      if (who) {
        const note = document.createElement("span");
        note.className = "hint segment-who";
        note.textContent = who.length ? `preview dubbed person ${who.join(", ")}` : "preview dubbed nobody";
        li.append(note);
      }
      list.append(li);
    });
  }

  // ---------------------------------------------------------------- what is sent

  function segmentValue(s) {
    const item = { ...s.extra, start: s.start, end: s.end };
    if (s.speaker === "point") {
      if (s.point) item.face_point = pointText(s.point);
    } else if (s.speaker !== "") {
      item.face = /^\d+$/.test(s.speaker) ? Number(s.speaker) : s.speaker;
    }
    return item;
  }

  function sentSegments() {
    return segments.length ? segments.map(segmentValue) : null;
  }

  function changed() {
    onChange({ facePoint: pointText(point), segments: sentSegments() });
  }

  /** The segments as typed into the options (a JSON list); ignored until it parses. */
  function setSegmentsFromText(text) {
    if (!text.trim()) {
      segments = [];
      selected = null;
      render();
      return;
    }
    let list;
    try {
      list = JSON.parse(text);
    } catch {
      return;
    }
    if (!Array.isArray(list) || !list.every((s) => s && typeof s.start === "number" && typeof s.end === "number")) {
      return;
    }
    segments = list.map(({ start, end, face, face_point: fp, ...extra }) => {
      const p = typeof fp === "string" ? parsePoint(fp) : Array.isArray(fp) ? fp.map(Math.round) : null;
      return { start, end, speaker: p ? "point" : face === undefined ? "" : String(face), point: p, extra };
    });
    selected = null;
    render();
  }

  return {
    load,
    showTracks,
    isShowing: (f) => Boolean(f) && f === file,
    setFacePointFromText(text) {
      point = parsePoint(text);
      render();
    },
    setSegmentsFromText,
    /** What a segment may name, from the Segment schema: face values (enums) and whether face_point. */
    setSpeakerChoices(choices) {
      speakerChoices = choices;
      if (!choices.point && !choices.faces.length) selected = null;
      render();
    },
    /** The preview's `at`: the selected segment's start, else the cursor; null: the service's default. */
    at() {
      if (selected) return selected.start;
      return cursorSet ? cursor : null;
    },
  };
}
