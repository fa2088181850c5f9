// AudioWorklet that plays streamed s16le PCM from one ring buffer with one continuous cursor.
//
// Why a worklet and not one AudioBufferSourceNode per chunk: chained source nodes are scheduled
// from the main thread, so any jank there leaves gaps, and every seam is a potential click. Here
// the audio thread pulls samples from a single queue, so chunk boundaries simply do not exist.
//
// Messages in (main -> worklet):
//   {type: "begin", id, inRate, prebufferMs}  new utterance: reset counters, set the input rate
//   {type: "pcm", id, buf, offset, length}    ArrayBuffer holding `length` s16le samples from byte `offset`
//   {type: "end", id}                         no more audio for this utterance: play out the rest
//   {type: "clear"}                           barge-in: fade out quickly and drop everything
// Messages out (worklet -> main):
//   {type: "stats", id, received, played, buffered, underruns, playing}  a few times per render second
//   {type: "drained", id, ...stats}           `end` was seen and every sample has been played

const STATS_EVERY_QUANTA = 4; // 4 x 128 frames: ~23 ms at 22.05 kHz, ~11 ms at 48 kHz
const FADE_FRAMES = 96; // ~2-4 ms: long enough to avoid a click on Stop, short enough to feel instant
const INITIAL_CAPACITY = 1 << 18; // ~12 s at 22.05 kHz; the ring grows when a long text outruns playback
const MAX_CAPACITY = 1 << 25; // ~25 min at 22.05 kHz: a hard cap so a runaway stream cannot eat RAM

class PcmPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Float32Array(INITIAL_CAPACITY);
    this.read = 0; // index of the oldest buffered input sample
    this.count = 0; // number of buffered input samples
    this.frac = 0; // fractional cursor position between ring[read] and ring[read + 1]
    this.step = 1; // input samples consumed per output frame (inRate / context rate)
    this.id = 0;
    this.prebuffer = 0; // input samples to collect before (re)starting, so we do not stutter at once
    this.playing = false;
    this.ended = false;
    this.received = 0;
    this.played = 0;
    this.underruns = 0;
    this.dropped = 0;
    this.fade = 0; // frames left in a Stop fade-out; 0 when not fading
    this.quanta = 0;
    this.dirty = false; // something changed since the last stats message (idle pages stay quiet)
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    this.dirty = true;
    switch (msg.type) {
      case "begin":
        this.drop();
        this.id = msg.id;
        // `sampleRate` is the AudioWorkletGlobalScope's context rate. If the server could not
        // give us that rate we resample here, once, instead of per chunk on the main thread.
        this.step = msg.inRate / sampleRate;
        this.prebuffer = Math.round((msg.inRate * (msg.prebufferMs ?? 60)) / 1000);
        this.playing = false;
        this.ended = false;
        this.received = 0;
        this.played = 0;
        this.underruns = 0;
        this.dropped = 0;
        this.fade = 0;
        break;
      case "pcm":
        if (msg.id === this.id && !this.fade) this.push(new Int16Array(msg.buf, msg.offset, msg.length));
        break;
      case "end":
        if (msg.id !== this.id) break;
        this.ended = true;
        // Nothing left to play (or nothing ever came): report completion now, since process()
        // only reports it on the playing -> stopped edge.
        if (this.count === 0) this.port.postMessage(this.stats("drained"));
        break;
      case "clear":
        // A hard cut mid-waveform clicks; ramp the next few frames down, then drop the rest.
        this.ended = true;
        this.fade = this.playing && this.count > 0 ? FADE_FRAMES : 0;
        if (!this.fade) this.drop();
        break;
    }
  }

  push(pcm) {
    const n = pcm.length;
    if (this.count + n > this.ring.length) this.grow(this.count + n);
    const cap = this.ring.length;
    let w = (this.read + this.count) % cap;
    let i = 0;
    const room = Math.min(n, cap - this.count);
    // Two straight runs (up to the end of the array, then from its start) instead of a modulo per sample.
    while (i < room) {
      const run = Math.min(room - i, cap - w);
      for (let k = 0; k < run; k++) this.ring[w + k] = pcm[i + k] / 32768;
      i += run;
      w = (w + run) % cap;
    }
    this.count += room;
    this.received += room;
    this.dropped += n - room;
  }

  grow(need) {
    let cap = this.ring.length;
    while (cap < need && cap < MAX_CAPACITY) cap *= 2;
    if (cap === this.ring.length) return;
    const next = new Float32Array(cap);
    for (let k = 0; k < this.count; k++) next[k] = this.ring[(this.read + k) % this.ring.length];
    this.ring = next;
    this.read = 0;
  }

  drop() {
    this.count = 0;
    this.read = 0;
    this.frac = 0;
    this.fade = 0;
    this.playing = false;
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const ch0 = out[0];
    const frames = ch0.length;
    const wasPlaying = this.playing;

    if (!this.playing && this.count > 0 && (this.count >= this.prebuffer || this.ended)) {
      this.playing = true;
    }

    let f = 0;
    if (this.playing) {
      const ring = this.ring;
      const cap = ring.length;
      // Interpolation needs the next sample too, unless we are at 1:1 or the stream has ended.
      const need = this.step === 1 ? 1 : 2;
      for (; f < frames; f++) {
        if (this.count < need && !(this.ended && this.count > 0)) break;
        const a = ring[this.read];
        const b = this.count > 1 ? ring[(this.read + 1) % cap] : a;
        let s = a + (b - a) * this.frac;
        if (this.fade) {
          s *= this.fade / FADE_FRAMES;
          if (--this.fade === 0) {
            this.drop();
            f++;
            break;
          }
        }
        ch0[f] = s;
        this.frac += this.step;
        while (this.frac >= 1 && this.count > 0) {
          this.frac -= 1;
          this.read = (this.read + 1) % cap;
          this.count--;
          this.played++;
        }
      }
      if (f < frames && this.count === 0) {
        this.playing = false;
        this.fade = 0;
        // Running dry before the server said `end` is an underrun (audible gap); after it, we
        // are simply finished.
        if (!this.ended) this.underruns++;
      } else if (f < frames) {
        this.playing = false;
        this.underruns++;
      }
    }
    for (; f < frames; f++) ch0[f] = 0;
    for (let c = 1; c < out.length; c++) out[c].set(ch0);

    const finished = this.ended && this.count === 0 && !this.fade;
    const due = ++this.quanta % STATS_EVERY_QUANTA === 0 && (this.playing || this.dirty);
    if (due || (wasPlaying && !this.playing)) {
      this.port.postMessage(this.stats(finished && wasPlaying ? "drained" : "stats"));
      this.dirty = false;
    }
    // Keep the processor alive for the life of the page: the node is reused by every utterance.
    return true;
  }

  stats(type) {
    return {
      type,
      id: this.id,
      received: this.received,
      played: this.played,
      buffered: this.count,
      underruns: this.underruns,
      dropped: this.dropped,
      playing: this.playing,
    };
  }
}

registerProcessor("pcm-player", PcmPlayer);
