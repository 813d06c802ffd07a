// The prototype store: class label -> running sum (float64) and count, optionally every
// embedding; and its file format, the same bytes the Python runtime reads and writes
// (runtime/store.py): safetensors with tensors `sums` float64 [C, D], `counts` int64 [C]
// and, when kept, `embeddings` float32 [N, D]; its `__metadata__` holds `edgemeta.store`
// (a JSON header) and `sha256` (a checksum over the header text and every tensor).

import { InputError, ModelMismatchError, StoreCorruptError } from './errors.js';
import { readTable, readTensors, writeSafetensors } from './safetensors.js';

export const FORMAT_NAME = 'edgemeta.prototype_store';
export const FORMAT_VERSION = 1;
export const HEADER_KEY = 'edgemeta.store';
export const CHECKSUM_KEY = 'sha256';
export const METRICS = ['sqeuclidean', 'cosine'];
// the limits the Python reader enforces, so that a file one side accepts the other does too
export const MAX_EMBEDDING_DIM = 1 << 16;
export const MAX_LABEL_LENGTH = 1024;
const MAX_COUNT = 2 ** 40;
const HEADER_FIELDS = ['counts', 'embedding_dim', 'fingerprint', 'format', 'keep_embeddings', 'labels', 'metric', 'version'];
const CONTROL = /\p{Cc}/u;
// with the u flag a surrogate pair is one code point: only an unpaired half matches
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

/**
 * A label as the store keeps it: a non-empty string without control characters, in
 * Unicode's composed form (NFC), so "café" typed and "café" from a decomposed folder name
 * are one class.
 * @param {unknown} label
 * @returns {string}
 */
export function checkLabel(label) {
  if (typeof label !== 'string') throw new InputError(`label must be a string, got ${typeof label} ${String(label)}; pass e.g. String(label)`);
  if (!label.trim()) throw new InputError(`label must be a non-empty string, got ${JSON.stringify(label)}; name the class`);
  if (CONTROL.test(label)) {
    throw new InputError(`label ${JSON.stringify(label)} contains control characters (newline, tab, escape, ...); name the class without them`);
  }
  if (LONE_SURROGATE.test(label)) throw new InputError(`label ${JSON.stringify(label)} holds a lone surrogate (not valid Unicode); rename the class`);
  return label.normalize('NFC');
}

function corrupt(source, why) {
  return new StoreCorruptError(`store ${source} is not a readable edgemeta store (${why}); restore it from a backup or re-enrol`);
}

function badHeader(source, why) {
  return new StoreCorruptError(`store ${source} has a bad header (${why}); restore it from a backup or re-enrol`);
}

/** The header as Python's json.dumps(header, sort_keys=True, ensure_ascii=False) writes it. */
function pythonJson(header) {
  const value = (v) => (Array.isArray(v) ? `[${v.map(value).join(', ')}]` : JSON.stringify(v));
  return `{${Object.keys(header).sort().map((k) => `${JSON.stringify(k)}: ${value(header[k])}`).join(', ')}}`;
}

/** sha256 over the header text, then each tensor sorted by name: "\0name\0dtype\0[shape]\0" and its bytes. */
async function checksum(headerText, tensors) {
  const enc = new TextEncoder();
  const parts = [enc.encode(headerText)];
  for (const [name, t] of [...tensors].sort((a, b) => (a[0] < b[0] ? -1 : 1))) {
    parts.push(enc.encode(`\0${name}\0${t.numpy}\0[${t.shape.join(', ')}]\0`));
    parts.push(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength));
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  // Web Crypto: browsers (secure contexts, localhost included) and Node 19+ have it global, Node 18 as node:crypto
  const subtle = globalThis.crypto?.subtle ?? (await import('node:crypto')).webcrypto.subtle;
  const digest = new Uint8Array(await subtle.digest('SHA-256', all));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

function needInt(header, key, lo, hi, source) {
  const v = header[key];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < lo || v > hi) {
    throw badHeader(source, `${key} must be an integer from ${lo} to ${hi}, got ${JSON.stringify(v)?.slice(0, 40)}`);
  }
  return v;
}

/** Every header field checked for type and range; returns the fields. */
function parseHeader(text, source) {
  let h;
  try {
    h = JSON.parse(text);
  } catch (e) {
    throw new StoreCorruptError(`store ${source} has an unreadable header (${e.message}); restore it from a backup or re-enrol`);
  }
  if (h === null || typeof h !== 'object' || Array.isArray(h) || h.format !== FORMAT_NAME) {
    const fmt = h !== null && typeof h === 'object' ? h.format : undefined;
    throw new StoreCorruptError(`${source} is not an edgemeta prototype store (format ${JSON.stringify(fmt ?? null).slice(0, 60)})`);
  }
  if (!Number.isInteger(h.version) || h.version < 1) {
    throw new StoreCorruptError(`store ${source} has an invalid format version ${JSON.stringify(h.version)}; restore it from a backup or re-enrol`);
  }
  if (h.version > FORMAT_VERSION) {
    throw new StoreCorruptError(
      `store ${source} has format version ${h.version}, newer than this edgemeta reads (${FORMAT_VERSION}); upgrade edgemeta`,
    );
  }
  const extra = Object.keys(h).filter((k) => !HEADER_FIELDS.includes(k));
  if (extra.length) throw badHeader(source, `unknown field(s) ${extra.sort().join(', ').slice(0, 80)}`);
  const dim = needInt(h, 'embedding_dim', 1, MAX_EMBEDDING_DIM, source);
  if (!METRICS.includes(h.metric)) throw badHeader(source, `metric must be one of ${METRICS.join(', ')}, got ${JSON.stringify(h.metric)}`);
  if (typeof h.fingerprint !== 'string' || h.fingerprint.length > 256) throw badHeader(source, 'fingerprint must be a string of at most 256 characters');
  if (!Array.isArray(h.labels)) throw badHeader(source, 'labels must be a list');
  if (!Array.isArray(h.counts)) throw badHeader(source, 'counts must be a list');
  const counts = h.counts.map((c, i) => {
    if (typeof c !== 'number' || !Number.isInteger(c) || c < 1 || c > MAX_COUNT) throw badHeader(source, `counts[${i}] must be an integer >= 1`);
    return c;
  });
  const keep = h.keep_embeddings ?? false;
  if (typeof keep !== 'boolean') throw badHeader(source, 'keep_embeddings must be true or false');
  const labels = h.labels.map((x, i) => {
    if (typeof x !== 'string') throw badHeader(source, `labels[${i}] must be a string`);
    if (x.length > MAX_LABEL_LENGTH) throw badHeader(source, `labels[${i}] is ${x.length} characters long, over the limit of ${MAX_LABEL_LENGTH}`);
    if (LONE_SURROGATE.test(x)) throw badHeader(source, `labels[${i}] holds a lone surrogate (not valid Unicode)`);
    if (CONTROL.test(x)) throw badHeader(source, `labels[${i}] holds control characters (newline, escape, ...)`);
    if (!x.trim()) throw badHeader(source, `labels[${i}] is empty`);
    return x.normalize('NFC'); // a store written before labels were composed reads as one written now
  });
  const seen = new Set();
  for (const x of labels) {
    if (seen.has(x)) throw badHeader(source, `label ${JSON.stringify(x)} appears twice (perhaps in two Unicode spellings)`);
    seen.add(x);
  }
  if (labels.length !== counts.length) throw badHeader(source, `${labels.length} labels but ${counts.length} counts`);
  return { fingerprint: h.fingerprint, embeddingDim: dim, metric: h.metric, labels, counts, keepEmbeddings: keep };
}

function sameModel(recorded, fingerprint, what) {
  if (recorded && recorded !== fingerprint) {
    throw new ModelMismatchError(`${what} was made with model ${recorded}, this model is ${fingerprint}; re-enrol or load the matching model`);
  }
}

/**
 * Class label -> running sum (float64) and count; optionally every embedding.
 *
 * Prototypes are the class means as float32, computed as the Python runtime does (float64
 * sums of float32 embeddings, divided by the count, rounded to float32).
 */
export class PrototypeStore {
  /**
   * @param {{embeddingDim: number, metric?: string, fingerprint?: string, keepEmbeddings?: boolean}} options
   */
  constructor({ embeddingDim, metric = 'sqeuclidean', fingerprint = '', keepEmbeddings = false }) {
    if (!Number.isInteger(embeddingDim) || embeddingDim < 1) throw new InputError(`embeddingDim must be a positive integer, got ${embeddingDim}`);
    if (!METRICS.includes(metric)) throw new InputError(`unknown metric ${JSON.stringify(metric)}; choose one of: ${METRICS.join(', ')}`);
    this.embeddingDim = embeddingDim;
    this.metric = metric;
    this.fingerprint = String(fingerprint);
    this.keepEmbeddings = Boolean(keepEmbeddings);
    /** @type {string[]} */
    this._labels = [];
    /** @type {Map<string, {sum: Float64Array, count: number, examples: Float32Array[]}>} */
    this._classes = new Map();
    this._prototypes = null;
  }

  /** Class labels in enrolment order (the row order of prototypes()). */
  get labels() {
    return [...this._labels];
  }

  /** Label -> number of enrolled examples. */
  get counts() {
    return Object.fromEntries(this._labels.map((l) => [l, this._classes.get(l).count]));
  }

  get size() {
    return this._labels.length;
  }

  has(label) {
    return typeof label === 'string' && this._classes.has(label.normalize('NFC'));
  }

  _row(label) {
    const key = typeof label === 'string' ? (this._classes.has(label) ? label : label.normalize('NFC')) : label;
    if (!this._classes.has(key)) {
      const shown = this._labels.slice(0, 10).map((x) => JSON.stringify(x)).join(', ') + (this._labels.length > 10 ? ', ...' : '');
      throw new InputError(`unknown label ${JSON.stringify(label)}; enrolled labels: ${shown || 'none'}`);
    }
    return key;
  }

  /** Class means, float32 [C * D] in label order; a new array after every change, never mutated. */
  prototypes() {
    if (!this._prototypes) {
      const d = this.embeddingDim;
      const out = new Float32Array(this._labels.length * d);
      this._labels.forEach((l, i) => {
        const { sum, count } = this._classes.get(l);
        for (let j = 0; j < d; j++) out[i * d + j] = sum[j] / count;
      });
      this._prototypes = out;
    }
    return this._prototypes;
  }

  /** The kept embeddings of every class, float32 [N * D], grouped in label order. */
  examples() {
    if (!this.keepEmbeddings) throw new InputError('the individual embeddings are not kept; create the store with keepEmbeddings: true and re-enrol');
    const parts = this._labels.flatMap((l) => this._classes.get(l).examples);
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /**
   * Add embeddings (float32 [n * D]) to `label`, creating it if new; returns its count.
   * @param {string} label
   * @param {Float32Array} embeddings
   */
  add(label, embeddings) {
    label = checkLabel(label);
    const d = this.embeddingDim;
    const e = embeddings instanceof Float32Array ? embeddings : Float32Array.from(embeddings);
    if (e.length === 0 || e.length % d !== 0) throw new InputError(`embeddings of length ${e.length} do not fit [n, ${d}]; use this model's embeddings`);
    const total = new Float64Array(d);
    for (let i = 0; i < e.length; i += d) for (let j = 0; j < d; j++) total[j] += e[i + j];
    if (!total.every(Number.isFinite)) throw new InputError("embeddings must be finite numbers; check the model's output");
    let cls = this._classes.get(label);
    if (!cls) {
      cls = { sum: new Float64Array(d), count: 0, examples: [] };
      this._classes.set(label, cls);
      this._labels.push(label);
    }
    for (let j = 0; j < d; j++) cls.sum[j] += total[j];
    cls.count += e.length / d;
    if (this.keepEmbeddings) cls.examples.push(Float32Array.from(e));
    this._prototypes = null;
    return cls.count;
  }

  /** Remove a class and everything enrolled for it. */
  forget(label) {
    const key = this._row(label);
    this._classes.delete(key);
    this._labels.splice(this._labels.indexOf(key), 1);
    this._prototypes = null;
  }

  /** Rename a class; with merge an existing `newLabel` absorbs the old one's examples. */
  rename(oldLabel, newLabel, { merge = false } = {}) {
    newLabel = checkLabel(newLabel);
    const old = this._row(oldLabel);
    if (old === newLabel) return;
    const target = this._classes.get(newLabel);
    if (target) {
      if (!merge) throw new InputError(`label ${JSON.stringify(newLabel)} already exists; pass {merge: true} to combine ${JSON.stringify(old)} into it`);
      const src = this._classes.get(old);
      for (let j = 0; j < this.embeddingDim; j++) target.sum[j] += src.sum[j];
      target.count += src.count;
      target.examples.push(...src.examples);
      this.forget(old);
      return;
    }
    this._classes.set(newLabel, this._classes.get(old));
    this._classes.delete(old);
    this._labels[this._labels.indexOf(old)] = newLabel;
    this._prototypes = null;
  }

  /**
   * Check that the store comes from the model with this fingerprint, width and metric; a
   * store that records no model (made by hand) is taken as this one's.
   */
  claim(fingerprint, embeddingDim, metric) {
    sameModel(this.fingerprint, fingerprint, 'store');
    if (this.embeddingDim !== embeddingDim || this.metric !== metric) {
      throw new ModelMismatchError(
        `store holds ${this.embeddingDim}-D ${this.metric} prototypes, this model gives ${embeddingDim}-D ${metric}; re-enrol or load the matching model`,
      );
    }
    this.fingerprint = this.fingerprint || fingerprint;
  }

  /** The store file's bytes (safetensors; header and checksum in its metadata). */
  async toBytes() {
    const n = this._labels.length;
    const d = this.embeddingDim;
    const sums = new Float64Array(n * d);
    const counts = new BigInt64Array(n);
    this._labels.forEach((l, i) => {
      const c = this._classes.get(l);
      sums.set(c.sum, i * d);
      counts[i] = BigInt(c.count);
    });
    // the order the reference writer lays them out in: 8-byte types first, then by name
    const tensors = [
      ['counts', { dtype: 'I64', numpy: '<i8', shape: [n], data: counts }],
      ['sums', { dtype: 'F64', numpy: '<f8', shape: [n, d], data: sums }],
    ];
    if (this.keepEmbeddings) {
      const emb = this.examples();
      tensors.push(['embeddings', { dtype: 'F32', numpy: '<f4', shape: [emb.length / d, d], data: emb }]);
    }
    const header = pythonJson({
      counts: this._labels.map((l) => this._classes.get(l).count),
      embedding_dim: d,
      fingerprint: this.fingerprint,
      format: FORMAT_NAME,
      keep_embeddings: this.keepEmbeddings,
      labels: this._labels,
      metric: this.metric,
      version: FORMAT_VERSION,
    });
    return writeSafetensors(tensors, { [CHECKSUM_KEY]: await checksum(header, tensors), [HEADER_KEY]: header });
  }

  /**
   * Parse and verify store bytes: layout, header schema, sizes, checksum; and, when
   * `fingerprint` is given, that the store was made with that model.
   * @param {Uint8Array|ArrayBuffer} data
   * @param {{source?: string, fingerprint?: string}} [options]
   * @returns {Promise<PrototypeStore>}
   */
  static async fromBytes(data, { source = 'store', fingerprint } = {}) {
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
    const bad = (why) => corrupt(source, why);
    const { table, metadata, headerLength } = readTable(bytes, source, bad);
    if (!(HEADER_KEY in metadata)) {
      throw new StoreCorruptError(`store ${source} is not a readable edgemeta store: a safetensors file without an edgemeta store header; pass a store file`);
    }
    const text = metadata[HEADER_KEY];
    const h = parseHeader(text, source);
    const c = h.labels.length;
    const d = h.embeddingDim;
    const total = h.counts.reduce((a, b) => a + b, 0);
    const expected = { sums: ['F64', [c, d]], counts: ['I64', [c]] };
    if (h.keepEmbeddings) expected.embeddings = ['F32', [total, d]];
    const problems = [];
    for (const name of [...new Set([...Object.keys(table), ...Object.keys(expected)])].sort()) {
      const got = table[name];
      const want = expected[name];
      if (!want) problems.push(`an unexpected tensor ${JSON.stringify(name.slice(0, 40))}`);
      else if (!got || got.dtype !== want[0] || JSON.stringify(got.shape) !== JSON.stringify(want[1])) {
        problems.push(`${name} tensor is not ${want[0]} [${want[1].join(', ')}]`);
      }
    }
    if (problems.length) {
      throw new StoreCorruptError(`store ${source} is inconsistent: ${problems.slice(0, 4).join('; ')}; restore it from a backup or re-enrol`);
    }
    const size = 8 + headerLength + 8 * c * d + 8 * c + (h.keepEmbeddings ? 4 * total * d : 0);
    if (bytes.length !== size) throw bad(`${bytes.length} bytes where its header declares ${size}: truncated or padded`);
    const tensors = readTensors(bytes, table, headerLength, bad);
    const named = Object.entries(tensors).map(([name, t]) => [name, { ...t, numpy: { F64: '<f8', F32: '<f4', I64: '<i8' }[t.dtype] }]);
    if (metadata[CHECKSUM_KEY] !== (await checksum(text, named))) {
      throw new StoreCorruptError(`store ${source} failed its checksum: the file was damaged or edited; restore it from a backup or re-enrol`);
    }
    const sums = tensors.sums.data;
    if (!Array.from(tensors.counts.data, Number).every((x, i) => x === h.counts[i])) problems.push('counts tensor does not match the header');
    if (!sums.every(Number.isFinite)) problems.push('sums tensor holds values that are not finite');
    if (tensors.embeddings && !tensors.embeddings.data.every(Number.isFinite)) problems.push('embeddings tensor holds values that are not finite');
    if (problems.length) {
      throw new StoreCorruptError(`store ${source} is inconsistent: ${problems.join('; ')}; restore it from a backup or re-enrol`);
    }
    if (fingerprint !== undefined) sameModel(h.fingerprint, fingerprint, `store ${source}`);
    const store = new PrototypeStore({ embeddingDim: d, metric: h.metric, fingerprint: h.fingerprint, keepEmbeddings: h.keepEmbeddings });
    let row = 0;
    h.labels.forEach((label, i) => {
      const n = h.counts[i];
      const examples = h.keepEmbeddings ? [tensors.embeddings.data.slice(row * d, (row + n) * d)] : [];
      row += n;
      store._classes.set(label, { sum: sums.slice(i * d, (i + 1) * d), count: n, examples });
      store._labels.push(label);
    });
    return store;
  }
}
