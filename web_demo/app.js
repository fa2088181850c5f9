// rtserver web demo: the reference browser client for /ws/tts (PCM) and POST /tts (MP3).
//
// Plain ES module, no build step. Audio path for PCM mode:
//   WebSocket binary frame [u32 LE stream id][s16le PCM]  ->  transferred (not copied) to the
//   AudioWorklet in pcm-worklet.js  ->  one ring buffer, one playback cursor  ->  AnalyserNode
//   (waveform + level meter)  ->  speakers.

const PREBUFFER_MS = 60; // worklet collects this much before starting, so the first chunk seam cannot underrun
const AGENT_DELAY_MS = [50, 80]; // agent mode: one word every 50-80 ms, roughly an LLM's token rate
const STOP_TIMEOUT_MS = 3000; // give up waiting for `cancelled` after this (socket stuck or gone)
const READY_TIMEOUT_MS = 5000;
// `?nomse` forces the MP3 fallback path, to try (and test) what Firefox and older iOS get.
const FORCE_MP3_FALLBACK = new URLSearchParams(location.search).has("nomse");

const $ = (id) => document.getElementById(id);
const ui = {
  text: $("text"),
  speaker: $("speaker"),
  instructions: $("instructions"),
  instructionsRow: $("instructions-row"),
  speed: $("speed"),
  speedOut: $("speed-out"),
  agent: $("agent"),
  speak: $("speak"),
  stop: $("stop"),
  status: $("status"),
  error: $("error"),
  conn: $("conn"),
  ttfa: $("stat-ttfa"),
  ttfaServer: $("stat-ttfa-server"),
  rtf: $("stat-rtf"),
  buffered: $("stat-buffered"),
  received: $("stat-received"),
  played: $("stat-played"),
  wave: $("wave"),
  meter: $("meter-fill"),
  segments: $("segments"),
  player: $("player"),
  footer: $("footer-info"),
  auth: $("auth"),
  key: $("key"),
};

// ---- API key --------------------------------------------------------------------------------
// A server started with --api-key needs one. The page keeps it for this tab only, takes it from
// `#key=...` (a fragment never reaches the server or its logs), sends it as a Bearer header on
// fetch and as the `rtserver.key.KEY` subprotocol on the WebSocket (browsers cannot set headers
// there).

const KEY_STORE = "rtserver.key";
const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
if (fromHash) {
  sessionStorage.setItem(KEY_STORE, fromHash);
  history.replaceState(null, "", location.pathname + location.search);
}
const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";
const authHeaders = (headers = {}) =>
  apiKey() ? { ...headers, authorization: `Bearer ${apiKey()}` } : headers;

ui.auth.addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, ui.key.value.trim());
  ui.key.value = "";
  ui.auth.hidden = true;
  loadSpeakers();
});

// Everything a test (or a curious person in the console) may want to read. Mutated only here;
// exposed through read-only getters as window.rtDemo below.
const demo = {
  state: "loading", // loading | idle | connecting | speaking | stopping
  mode: "pcm", // pcm | mp3
  connection: "closed", // closed | connecting | open
  speakersLoaded: false,
  speakers: [],
  utterances: 0,
  contextId: null,
  stream: null,
  sampleRate: null, // rate of the current context's PCM (from `started`)
  outputRate: null, // the AudioContext's rate
  samplesReceived: 0, // PCM samples that arrived over the socket (main thread)
  workletReceived: 0, // samples the worklet accepted into its ring buffer
  samplesPlayed: 0, // samples the worklet's cursor has consumed (reported over its message port)
  bufferedMs: 0,
  underruns: 0,
  ttfaMs: null, // click -> first audio bytes, as the person experiences it
  serverTtfaMs: null, // the server's own figure from `done`
  rtf: null,
  audioMs: null,
  segments: 0,
  mp3Bytes: 0,
  mp3CurrentTime: 0,
  mp3Transport: null, // "mse" (streamed into MediaSource) | "blob" (fallback: whole file, then play)
  cancelsSent: 0,
  lastEvent: null,
  lastError: null, // {code, message}
  errorCount: 0,
};

const api = { snapshot: () => structuredClone(demo) };
for (const key of Object.keys(demo)) {
  // structuredClone so a reader cannot mutate our arrays/objects through the getter.
  Object.defineProperty(api, key, { enumerable: true, get: () => structuredClone(demo[key]) });
}
window.rtDemo = Object.freeze(api);

// ---- small helpers ------------------------------------------------------------------------

const FRIENDLY = {
  unknown_speaker: "Unknown speaker",
  busy: "Server busy",
  too_many_contexts: "Too many open streams on this connection",
  text_too_long: "Text too long",
  invalid_text: "Text rejected",
  synthesis_failed: "Synthesis failed",
  idle_timeout: "Connection timed out",
  invalid_message: "The server rejected a message",
  socket_closed: "Connection closed",
  connect_failed: "Cannot connect",
  http: "Request failed",
  bad_request: "Request rejected",
  invalid_request: "Invalid request",
  audio: "Audio playback problem",
  speakers: "Could not load speakers",
  empty_text: "Nothing to say",
};

// Errors after which the server keeps the context open: it only dropped that fragment.
const FRAGMENT_ERRORS = new Set(["text_too_long", "invalid_text"]);

// POST /tts statuses, mapped onto the same codes the WebSocket uses where they mean the same.
const HTTP_ERROR_CODES = { 400: "bad_request", 413: "text_too_long", 422: "invalid_request", 503: "busy" };

function showError(code, message) {
  demo.lastError = { code, message };
  demo.errorCount++;
  const title = FRIENDLY[code] ?? code;
  ui.error.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  ui.error.append(strong, document.createTextNode(message ? ` — ${message}` : ""));
  ui.error.dataset.code = code;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
  delete ui.error.dataset.code;
}

function setStatus(text) {
  ui.status.textContent = text;
}

function setState(state) {
  demo.state = state;
  document.body.dataset.state = state;
  const busy = state === "connecting" || state === "speaking" || state === "stopping";
  ui.stop.disabled = !busy || state === "stopping";
  ui.speak.disabled = !demo.speakersLoaded;
}

function setConnection(state, label) {
  demo.connection = state;
  ui.conn.dataset.state = state;
  ui.conn.textContent = label;
}

const fmtMs = (ms) =>
  ms == null ? "—" : ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
const fmtSec = (samples, rate) => (rate ? `${(samples / rate).toFixed(2)} s` : "—");
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const once = (target, type) =>
  new Promise((resolve) => target.addEventListener(type, resolve, { once: true }));

// Litestar error bodies are {"status_code", "detail", "extra"}; fall back to plain text.
async function httpErrorText(res) {
  let detail = "";
  try {
    const body = await res.text();
    try {
      const json = JSON.parse(body);
      detail = typeof json.detail === "string" ? json.detail : JSON.stringify(json.detail ?? json);
    } catch {
      detail = body.slice(0, 300);
    }
  } catch {
    /* body unreadable: the status line is all we have */
  }
  return `HTTP ${res.status}${detail ? `: ${detail}` : ""}`;
}

// ---- speakers -----------------------------------------------------------------------------

async function loadSpeakers() {
  try {
    const res = await fetch("/speakers", { headers: authHeaders({ accept: "application/json" }) });
    if (res.status === 401) {
      ui.auth.hidden = false;
      ui.speaker.replaceChildren(new Option("needs a key", ""));
      setState("idle");
      setStatus(apiKey() ? "That key was refused." : "This server needs an API key.");
      return;
    }
    if (!res.ok) throw new Error(await httpErrorText(res));
    const body = await res.json();
    const list = (Array.isArray(body) ? body : (body.speakers ?? [])).map((s) =>
      typeof s === "string" ? { id: s } : s,
    );
    demo.speakers = list;
    ui.speaker.replaceChildren(
      ...list.map((s) => {
        const opt = document.createElement("option");
        opt.value = s.id;
        const extra = [s.language, s.sample_rate && `${s.sample_rate / 1000} kHz`, s.engine].filter(Boolean);
        opt.textContent = extra.length ? `${s.id} · ${extra.join(" · ")}` : s.id;
        return opt;
      }),
    );
    ui.speaker.disabled = list.length === 0;
    demo.speakersLoaded = list.length > 0;
    showInstructions();
    ui.footer.textContent = `${plural(list.length, "speaker")} available`;
    setState("idle");
    setStatus(list.length ? "Ready." : "The server has no speakers.");
  } catch (err) {
    ui.speaker.replaceChildren(new Option("unavailable", ""));
    setState("idle");
    setStatus("Not ready.");
    showError("speakers", err.message);
  }
}

// ---- audio graph ----------------------------------------------------------------------------

const audio = { ctx: null, node: null, analyser: null, mediaNode: null, ready: null };

// Must be called synchronously from the click handler: browsers only let an AudioContext start
// (and media play) inside a user gesture. The first call picks the context's rate; later
// utterances ask the server for that rate, and the worklet resamples if it cannot comply.
function ensureAudio(preferredRate) {
  if (!audio.ctx) {
    let ctx;
    try {
      // Matching the stream's rate means no resampling anywhere in our code; the browser
      // converts to the device rate once, with its own high-quality resampler.
      ctx = new AudioContext({ sampleRate: preferredRate, latencyHint: "interactive" });
    } catch {
      ctx = new AudioContext({ latencyHint: "interactive" });
    }
    audio.ctx = ctx;
    demo.outputRate = ctx.sampleRate;
    audio.analyser = ctx.createAnalyser();
    audio.analyser.fftSize = 2048;
    audio.analyser.connect(ctx.destination);
    // AudioWorklet exists only in secure contexts: https, or http on localhost/127.0.0.1. A page
    // opened as http://<lan-ip>/ has none, and should say why instead of failing obscurely.
    const worklet = ctx.audioWorklet
      ? ctx.audioWorklet.addModule(new URL("pcm-worklet.js", import.meta.url))
      : Promise.reject(new Error("AudioWorklet needs https or localhost; MP3 mode still works here"));
    audio.ready = worklet.then(() => {
      const node = new AudioWorkletNode(ctx, "pcm-player", {
        numberOfInputs: 0,
        numberOfOutputs: 1,
        outputChannelCount: [1],
      });
      node.port.onmessage = (e) => onWorkletMessage(e.data);
      node.connect(audio.analyser);
      audio.node = node;
    });
    audio.ready.catch(() => {}); // reported by speakPcm, which is the one that needs it
  }
  if (audio.ctx.state !== "running") audio.ctx.resume().catch(() => {});
  return audio.ready;
}

// MP3 mode: route the <audio> element through the same analyser, so the meter shows it too.
// An element can be attached to a graph only once, hence the single AudioContext per page.
function routeMediaElement() {
  if (audio.mediaNode || !audio.ctx) return;
  // WebKit (the only engine with ManagedMediaSource) has a history of silent output once a
  // MediaSource-fed element is routed into Web Audio; there, hearing it beats metering it.
  if (window.ManagedMediaSource) return;
  try {
    audio.mediaNode = audio.ctx.createMediaElementSource(ui.player);
    audio.mediaNode.connect(audio.analyser);
  } catch {
    /* no metering for MP3; the element still plays on its own */
  }
}

function onWorkletMessage(m) {
  const u = current;
  if (!u || u.n !== m.id || u.mode !== "pcm") return;
  demo.workletReceived = m.received;
  demo.samplesPlayed = m.played;
  demo.underruns = m.underruns;
  demo.bufferedMs = u.rate ? (m.buffered / u.rate) * 1000 : 0;
  if (m.type === "drained" && u.serverDone && !u.finished && !u.stopping) finish(u, "done");
}

// ---- WebSocket --------------------------------------------------------------------------------

let sock = null; // {ws, info, ready: Promise<ready message>}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws/tts`;
}

// One socket for the page, opened on demand and reused by every utterance; if the server closes
// it (idle timeout, restart) the next Speak opens a fresh one.
function connect() {
  if (sock && sock.ws.readyState <= WebSocket.OPEN) return sock.ready;
  const key = apiKey();
  const ws = new WebSocket(wsUrl(), key ? ["rtserver", `rtserver.key.${key}`] : []);
  ws.binaryType = "arraybuffer"; // Int16Array views need an ArrayBuffer, not a Blob
  const s = { ws, info: null };
  s.ready = new Promise((resolve, reject) => {
    s.resolve = resolve;
    s.reject = reject;
  });
  const timer = setTimeout(() => {
    s.reject(new Error("no `ready` from the server"));
    ws.close(); // so the next Speak opens a fresh socket instead of reusing this stuck one
  }, READY_TIMEOUT_MS);
  s.ready.finally(() => clearTimeout(timer)).catch(() => {});
  ws.onmessage = (e) => (typeof e.data === "string" ? onEvent(s, e.data) : onAudio(e.data));
  ws.onclose = (e) => onSocketClose(s, e);
  ws.onerror = () => {}; // the close event that follows carries the code; error events carry nothing
  sock = s;
  setConnection("connecting", "connecting…");
  return s.ready;
}

function send(msg) {
  if (!sock || sock.ws.readyState !== WebSocket.OPEN) return false;
  sock.ws.send(JSON.stringify(msg));
  return true;
}

function onSocketClose(s, e) {
  s.reject(new Error(`socket closed (code ${e.code})`));
  if (sock !== s) return;
  sock = null;
  setConnection("closed", "disconnected");
  const u = current;
  for (const other of contexts.values()) if (other !== u) finish(other, "error");
  if (u && u.mode === "pcm" && !u.finished) {
    const why = e.reason ? `${e.reason} (code ${e.code})` : `code ${e.code}`;
    if (u.startSent) showError("socket_closed", `the server closed the connection mid-stream: ${why}`);
    else showError("connect_failed", `the WebSocket closed before it was ready: ${why}`);
    // Whatever already arrived is still worth hearing; let the worklet play it out.
    finish(u, "error", { keepAudio: true });
  }
}

function onEvent(s, text) {
  let msg;
  try {
    msg = JSON.parse(text);
  } catch {
    showError("invalid_message", "the server sent a frame that is not JSON");
    return;
  }
  demo.lastEvent = msg.type;
  // Look the context up by id, not "the current one": after a barge-in the previous context
  // still has to settle (its `cancelled`) while the new one is already starting.
  const u = msg.context_id != null ? contexts.get(msg.context_id) : undefined;
  const mine = u !== undefined && u === current;
  switch (msg.type) {
    case "ready":
      s.info = msg;
      setConnection("open", "connected");
      ui.footer.textContent = `${msg.server ?? "server"} ${msg.version ?? ""} · ${msg.engine ?? "engine"} · ${msg.sample_rate} Hz · ${plural(msg.speakers?.length ?? 0, "speaker")}`;
      s.resolve(msg);
      break;
    case "started":
      if (!mine) break;
      u.stream = msg.stream;
      u.rate = msg.sample_rate;
      demo.stream = msg.stream;
      demo.sampleRate = msg.sample_rate;
      audio.node.port.postMessage({
        type: "begin",
        id: u.n,
        inRate: msg.sample_rate,
        prebufferMs: PREBUFFER_MS,
      });
      break;
    case "segment":
      if (mine) addSegment(msg);
      break;
    case "cancelled":
      if (u) finish(u, "cancelled");
      break;
    case "done":
      if (u && !mine) finish(u, "cancelled"); // superseded; it finished before our cancel landed
      if (!mine) break;
      demo.rtf = msg.rtf;
      demo.serverTtfaMs = msg.ttfa_ms;
      demo.audioMs = msg.audio_ms;
      u.serverDone = true;
      if (u.stopping) finish(u, "cancelled");
      // The server is finished; we are not until the worklet has played the tail.
      else audio.node.port.postMessage({ type: "end", id: u.n });
      break;
    case "error":
      onServerError(msg);
      break;
    default: // flushed, pong: nothing to show
      break;
  }
}

function onServerError(msg) {
  const cur = current;
  const active = cur && cur.mode === "pcm" && !cur.finished;
  const u = msg.context_id == null ? (active ? cur : undefined) : contexts.get(msg.context_id);
  if (msg.code === "idle_timeout" && !active) {
    setStatus("Idle connection closed by the server; Speak reconnects.");
    return;
  }
  // Our cancel crossed the server's `done` on the wire: nothing went wrong.
  if (msg.code === "unknown_context" && u?.stopping) {
    finish(u, "cancelled");
    return;
  }
  if (msg.context_id != null && u !== cur) {
    if (u) finish(u, "error"); // a superseded context failed: nothing to show the person
    return;
  }
  showError(msg.code, msg.message);
  if (!u) return;
  // The utterance ends here; left open, its context would speak unheard (agent mode never
  // sends its `close` now) and hold a synthesis slot until the server's idle timeout.
  if (FRAGMENT_ERRORS.has(msg.code) && !u.serverDone) send({ type: "cancel", context_id: u.id });
  finish(u, "error", { keepAudio: true });
}

function onAudio(buf) {
  const u = current;
  if (!u || u.finished || u.stopping || u.mode !== "pcm" || buf.byteLength < 4) return;
  if (new DataView(buf).getUint32(0, true) !== u.stream) return; // another (or a cancelled) context
  const n = (buf.byteLength - 4) >> 1;
  if (n === 0) return;
  if (demo.ttfaMs == null) demo.ttfaMs = performance.now() - u.t0;
  demo.samplesReceived += n;
  // Transfer the frame to the audio thread without copying; the 4-byte header keeps the
  // Int16Array view aligned, so the worklet reads the samples in place.
  audio.node.port.postMessage({ type: "pcm", id: u.n, buf, offset: 4, length: n }, [buf]);
}

// ---- utterances -------------------------------------------------------------------------------

let current = null; // the utterance being spoken (or the last one)
let seq = 0;
const contexts = new Map(); // context_id -> PCM utterance the server may still send events for

function newUtterance(mode) {
  seq++;
  const rand = Math.random().toString(36).slice(2, 8);
  current = {
    n: seq,
    id: `demo-${seq}-${rand}`,
    mode,
    t0: performance.now(),
    stream: null,
    rate: null,
    serverDone: false,
    stopping: false,
    finished: false,
    timers: [],
    abort: null,
    objectUrl: null,
  };
  current.settled = new Promise((resolve) => (current.settle = resolve));
  if (mode === "pcm") contexts.set(current.id, current);
  Object.assign(demo, {
    mode,
    utterances: seq,
    contextId: mode === "pcm" ? current.id : null,
    stream: null,
    sampleRate: null,
    samplesReceived: 0,
    workletReceived: 0,
    samplesPlayed: 0,
    bufferedMs: 0,
    underruns: 0,
    ttfaMs: null,
    serverTtfaMs: null,
    rtf: null,
    audioMs: null,
    segments: 0,
    mp3Bytes: 0,
    mp3CurrentTime: 0,
    mp3Transport: null,
  });
  ui.segments.replaceChildren();
  return current;
}

// Barge-in by speaking again: the server frees a cancelled context's slot only once it has
// dropped the job (it then sends `cancelled`), so starting before that can be refused as busy.
function othersSettled(u) {
  const pending = [...contexts.values()].filter((c) => c !== u).map((c) => c.settled);
  if (!pending.length) return Promise.resolve();
  return Promise.race([Promise.all(pending), new Promise((r) => setTimeout(r, STOP_TIMEOUT_MS))]);
}

// Split text into pieces that fit the server's max_message_bytes, cutting at spaces.
function chunkText(text, maxBytes) {
  const limit = Math.max(64, Math.floor(((maxBytes ?? 65536) - 256) / 4)); // 4: worst-case UTF-8 bytes per char
  const pieces = [];
  let rest = text;
  while (rest.length > limit) {
    let cut = rest.lastIndexOf(" ", limit);
    if (cut <= 0) cut = limit;
    pieces.push(rest.slice(0, cut + 1));
    rest = rest.slice(cut + 1);
  }
  if (rest) pieces.push(rest);
  return pieces;
}

async function speakPcm(u, { text, spk, speed, agent, instructions }) {
  setState("connecting");
  setStatus("Connecting…");
  let info;
  try {
    await audio.ready;
  } catch (err) {
    if (u !== current || u.finished) return;
    showError("audio", `cannot play PCM: ${err.message}`);
    finish(u, "error");
    return;
  }
  try {
    await othersSettled(u);
    info = await connect();
  } catch (err) {
    if (u !== current || u.finished) return;
    showError("connect_failed", err.message);
    finish(u, "error");
    return;
  }
  if (u !== current || u.finished) return; // stopped (or replaced) while we were connecting
  // Said before anything is sent: past the limit the server drops the fragment that crosses
  // it, and the page's own pieces are no measure of what the person typed.
  const chars = [...text].length; // code points, as the server counts
  if (info.max_text_chars != null && chars > info.max_text_chars) {
    const most = info.max_text_chars;
    showError("text_too_long", `the text has ${chars} characters; this server speaks at most ${most} at a time`);
    finish(u, "error");
    return;
  }

  const rate = audio.ctx.sampleRate;
  const start = { type: "start", context_id: u.id, spk_id: spk, format: "pcm", speed, seed: 0 };
  if (instructions) start.instructions = instructions;
  // Ask for the AudioContext's own rate, so the worklet can copy samples 1:1.
  if (rate >= 8000 && rate <= 48000) start.sample_rate = Math.round(rate);

  setState("speaking");
  u.startSent = true;
  if (agent) {
    // Like an LLM streaming tokens: the words (with their trailing spaces) go out one by one,
    // and the server decides on its own when it has enough for a sentence.
    setStatus("Speaking (agent mode: sending word by word)…");
    send(start);
    const words = text.match(/\S+\s*/g) ?? [];
    let i = 0;
    const next = () => {
      if (u.finished || u.stopping) return;
      if (i < words.length) {
        send({ type: "text", context_id: u.id, text: words[i++] });
        const [lo, hi] = AGENT_DELAY_MS;
        u.timers.push(setTimeout(next, lo + Math.random() * (hi - lo)));
      } else {
        send({ type: "close", context_id: u.id });
      }
    };
    next();
  } else {
    setStatus("Speaking…");
    const pieces = chunkText(text, info.max_message_bytes);
    start.text = pieces.shift();
    send(start);
    for (const piece of pieces) send({ type: "text", context_id: u.id, text: piece });
    send({ type: "close", context_id: u.id });
  }
}

async function speakMp3(u, { text, spk, speed, instructions }) {
  setState("connecting");
  setStatus("Requesting MP3…");
  routeMediaElement();
  const player = ui.player;
  const MS = window.ManagedMediaSource || window.MediaSource;
  const useMse = Boolean(MS && MS.isTypeSupported("audio/mpeg")) && !FORCE_MP3_FALLBACK;
  demo.mp3Transport = useMse ? "mse" : "blob";
  let mse = null;
  if (useMse) {
    // Attach the MediaSource and call play() now, still inside the click's user activation;
    // playback starts by itself when the first bytes are appended.
    mse = new MS();
    if (MS === window.ManagedMediaSource) player.disableRemotePlayback = true; // Safari requires it
    u.objectUrl = URL.createObjectURL(mse);
    player.src = u.objectUrl;
    player.play().catch((err) => playRejected(u, err));
  }

  u.abort = new AbortController();
  await othersSettled(u);
  if (u.finished) return;
  let res;
  try {
    res = await fetch("/tts", {
      method: "POST",
      headers: authHeaders({ "content-type": "application/json" }),
      body: JSON.stringify({
        tts_text: text,
        spk_id: spk,
        stream: true,
        speed,
        seed: 0,
        ...(instructions && { instructions }),
      }),
      signal: u.abort.signal,
    });
    if (!res.ok) {
      const detail = await httpErrorText(res);
      if (u.finished) return;
      const code = HTTP_ERROR_CODES[res.status] ?? "http";
      showError(code, detail);
      finish(u, "error");
      return;
    }
  } catch (err) {
    if (u.finished) return; // aborted by Stop
    showError("http", err.message);
    finish(u, "error");
    return;
  }
  if (u.finished) return;
  setState("speaking");
  setStatus(
    useMse ? "Playing MP3 (streamed through MediaSource)…" : "Downloading MP3 (no MediaSource here)…",
  );
  player.onended = () => finish(u, "done");

  try {
    const reader = res.body.getReader();
    const chunks = [];
    let sb = null;
    if (useMse) {
      if (mse.readyState !== "open") await once(mse, "sourceopen");
      sb = mse.addSourceBuffer("audio/mpeg");
    }
    for (;;) {
      const { value, done } = await reader.read();
      if (u.finished) {
        reader.cancel().catch(() => {});
        return;
      }
      if (done) break;
      if (demo.ttfaMs == null) demo.ttfaMs = performance.now() - u.t0;
      demo.mp3Bytes += value.byteLength;
      if (sb) {
        sb.appendBuffer(value);
        await once(sb, "updateend");
      } else {
        chunks.push(value);
      }
    }
    u.serverDone = true;
    if (sb) {
      if (mse.readyState === "open") mse.endOfStream();
    } else {
      // Fallback (Firefox without MP3 in MSE, iOS before ManagedMediaSource): whole file, then play.
      u.objectUrl = URL.createObjectURL(new Blob(chunks, { type: "audio/mpeg" }));
      player.src = u.objectUrl;
      await player.play().catch((err) => playRejected(u, err));
      setStatus("Playing MP3…");
    }
  } catch (err) {
    if (u.finished) return;
    showError("audio", err.message);
    finish(u, "error");
  }
}

function playRejected(u, err) {
  if (u.finished || err.name === "AbortError") return; // Stop pulled the source away: expected
  showError("audio", `the browser refused to play (${err.name}); press Speak again`);
  finish(u, "error");
}

// Stop (barge-in): the person wants silence now, not after the server replies.
function stop(u) {
  if (!u || u.finished || u.stopping) return;
  u.timers.forEach(clearTimeout);
  if (u.mode === "mp3") {
    finish(u, "stopped");
    return;
  }
  audio.node?.port.postMessage({ type: "clear" });
  // Only a context the server works on needs a cancel: not one whose `start` is still unsent
  // (speakPcm sees `finished` and never sends it), nor one past `done`.
  if (u.startSent && !u.serverDone && send({ type: "cancel", context_id: u.id })) {
    demo.cancelsSent++;
    u.stopping = true;
    setState("stopping");
    setStatus("Stopping…");
    u.timers.push(
      setTimeout(() => {
        if (!u.finished) {
          if (u === current) showError("socket_closed", "the server did not confirm the cancel");
          finish(u, "cancelled");
        }
      }, STOP_TIMEOUT_MS),
    );
  } else {
    finish(u, "stopped");
  }
}

function finish(u, reason, { keepAudio = false } = {}) {
  if (u.finished) return;
  u.finished = true;
  u.timers.forEach(clearTimeout);
  contexts.delete(u.id);
  u.settle(reason);
  if (current !== u) return; // superseded: the worklet and the page belong to the new utterance
  if (u.mode === "pcm") {
    if (keepAudio) audio.node?.port.postMessage({ type: "end", id: u.n });
    else if (reason !== "done") audio.node?.port.postMessage({ type: "clear" });
  } else {
    u.abort?.abort();
    if (reason !== "done") {
      ui.player.pause();
      ui.player.removeAttribute("src");
      ui.player.load();
    }
    ui.player.onended = null;
    if (u.objectUrl) URL.revokeObjectURL(u.objectUrl);
  }
  {
    setState("idle");
    const secs = demo.audioMs != null ? ` ${(demo.audioMs / 1000).toFixed(1)} s of audio.` : "";
    setStatus(
      {
        done: demo.audioMs === 0 ? "Done: the text had nothing to speak." : `Done.${secs}`,
        cancelled: "Stopped (server confirmed the cancel).",
        stopped: "Stopped.",
        error: "Stopped by an error.",
      }[reason] ?? reason,
    );
  }
}

function addSegment(msg) {
  demo.segments++;
  const li = document.createElement("li");
  li.dataset.start = msg.start_ms;
  li.dataset.end = msg.end_ms;
  const t = document.createElement("span");
  t.className = "t";
  t.textContent = `${(msg.start_ms / 1000).toFixed(2)} s`;
  li.append(t, document.createTextNode(msg.text));
  ui.segments.append(li);
}

// ---- controls -----------------------------------------------------------------------------------

// The instructions field, for a speaker whose model takes them (GET /speakers says so).
function showInstructions() {
  const spk = demo.speakers.find((s) => s.id === ui.speaker.value);
  ui.instructionsRow.hidden = !spk?.instructions;
}

function selectedMode() {
  return document.querySelector('input[name="mode"]:checked')?.value ?? "pcm";
}

function onSpeak() {
  clearError();
  const text = ui.text.value.trim();
  if (!text) {
    showError("empty_text", "type something in the text box first.");
    return;
  }
  const spk = ui.speaker.value;
  const speed = Number(ui.speed.value);
  const mode = selectedMode();
  const rate = demo.speakers.find((s) => s.id === spk)?.sample_rate ?? 22050;

  // Barge-in by speaking again: silence the old utterance now; the new one starts as soon as
  // the server has confirmed the cancel.
  if (current && !current.finished) stop(current);
  ensureAudio(rate); // synchronously, inside the click (autoplay rules)
  const u = newUtterance(mode);
  const instructions = ui.instructionsRow.hidden ? "" : ui.instructions.value.trim();
  const args = { text, spk, speed, agent: ui.agent.checked, instructions };
  (mode === "mp3" ? speakMp3(u, args) : speakPcm(u, args)).catch((err) => {
    showError("audio", err.message);
    finish(u, "error");
  });
}

ui.speak.addEventListener("click", onSpeak);
ui.speaker.addEventListener("change", showInstructions);
ui.stop.addEventListener("click", () => stop(current));
ui.speed.addEventListener("input", () => {
  ui.speedOut.textContent = `${Number(ui.speed.value).toFixed(2)}×`;
});
document.querySelectorAll('input[name="mode"]').forEach((r) =>
  r.addEventListener("change", () => {
    ui.agent.disabled = selectedMode() === "mp3"; // POST /tts takes the whole text at once
  }),
);
ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !ui.speak.disabled) onSpeak();
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") stop(current);
});
ui.player.addEventListener("timeupdate", () => {
  demo.mp3CurrentTime = ui.player.currentTime;
});
ui.player.addEventListener("error", () => {
  const u = current;
  if (u && u.mode === "mp3" && !u.finished && ui.player.error) {
    showError("audio", ui.player.error.message || `media error ${ui.player.error.code}`);
    finish(u, "error");
  }
});

// ---- live numbers, waveform and level meter ---------------------------------------------------

let scopeBuf = null;

function render() {
  const u = current;
  const rate = demo.sampleRate;
  ui.ttfa.textContent = demo.ttfaMs == null ? "—" : fmtMs(demo.ttfaMs);
  ui.ttfaServer.textContent = demo.serverTtfaMs == null ? "" : `server ${fmtMs(demo.serverTtfaMs)}`;
  ui.rtf.textContent = demo.rtf == null ? "—" : demo.rtf.toFixed(3);
  if (u?.mode === "mp3") {
    const p = ui.player;
    const end = p.buffered.length ? p.buffered.end(p.buffered.length - 1) : 0;
    ui.buffered.textContent = fmtMs(Math.max(0, end - p.currentTime) * 1000);
    ui.received.textContent = `${(demo.mp3Bytes / 1024).toFixed(1)} KiB`;
    ui.played.textContent = `${p.currentTime.toFixed(2)} s`;
  } else {
    ui.buffered.textContent = rate ? fmtMs(demo.bufferedMs) : "—";
    ui.received.textContent = u ? fmtSec(demo.samplesReceived, rate) : "—";
    ui.played.textContent = u ? fmtSec(demo.samplesPlayed, rate) : "—";
    // Highlight the sentence under the playback cursor.
    const playedMs = rate ? (demo.samplesPlayed / rate) * 1000 : -1;
    for (const li of ui.segments.children) {
      li.classList.toggle("now", playedMs >= +li.dataset.start && playedMs < +li.dataset.end);
    }
  }
  drawScope();
  requestAnimationFrame(render);
}

function drawScope() {
  const c = ui.wave;
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(c.clientWidth * dpr);
  const h = Math.round(c.clientHeight * dpr);
  if (c.width !== w || c.height !== h) Object.assign(c, { width: w, height: h });
  const g = c.getContext("2d");
  g.clearRect(0, 0, w, h);
  const style = getComputedStyle(c);
  g.strokeStyle = style.getPropertyValue("--grid").trim() || "#ccc";
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(0, h / 2);
  g.lineTo(w, h / 2);
  g.stroke();
  let level = 0;
  if (audio.analyser) {
    const a = audio.analyser;
    scopeBuf ??= new Float32Array(a.fftSize);
    a.getFloatTimeDomainData(scopeBuf);
    let sum = 0;
    g.strokeStyle = style.getPropertyValue("--wave").trim() || "#36c";
    g.lineWidth = 1.5 * dpr;
    g.beginPath();
    for (let i = 0; i < scopeBuf.length; i++) {
      const v = scopeBuf[i];
      sum += v * v;
      const x = (i / (scopeBuf.length - 1)) * w;
      const y = h / 2 - v * (h / 2) * 0.95;
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    }
    g.stroke();
    // RMS in dBFS mapped from -60..0 dB onto the bar: speech sits around -30..-10.
    const db = 10 * Math.log10(sum / scopeBuf.length + 1e-12);
    level = Math.min(1, Math.max(0, (db + 60) / 60));
  }
  ui.meter.style.width = `${(level * 100).toFixed(1)}%`;
}

// ---- start -------------------------------------------------------------------------------------

setState("loading");
requestAnimationFrame(render);
loadSpeakers();
