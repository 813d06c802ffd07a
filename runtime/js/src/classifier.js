// Few-shot classification with an exported edgemeta model on any ONNX Runtime for
// JavaScript (onnxruntime-node, onnxruntime-web): the same contract and the same verdicts
// as the Python runtime's FewShotClassifier (runtime/classifier.py).
//
// Images go to the graph as they are decoded: RGBA from a canvas (ImageData), RGB or grey
// bytes, any size; the model's `pixels` entry converts colour, resizes and normalizes. A
// model exported before that entry existed takes only preprocessed float tensors
// (`images`), which an app must then make exactly as training did.

import { InputError, ModelMismatchError } from './errors.js';
import { modelMetadata } from './metadata.js';
import { PrototypeStore, checkLabel } from './store.js';

export const INPUT_PIXELS = 'pixels';
export const INPUT_IMAGES = 'images';
export const INPUT_PROTOTYPES = 'prototypes';
export const OUTPUT_EMBEDDINGS = 'embeddings';
export const OUTPUT_LOGITS = 'logits';
export const PIXELS_EXPORT =
  'export it again with `edgemeta export CHECKPOINT -o MODEL.onnx` (a model from elsewhere: `edgemeta wrap`), which adds the `pixels` entry';

/**
 * Which kind of input an image is: raw pixels ({data: Uint8Array|Uint8ClampedArray, width,
 * height[, channels]}, e.g. ImageData) or a preprocessed float tensor ({data: Float32Array,
 * dims: [C, H, W] or [B, C, H, W]}).
 */
function describe(image, i) {
  if (image === null || typeof image !== 'object' || !ArrayBuffer.isView(image.data)) {
    throw new InputError(
      `image ${i} is ${image === null ? 'null' : typeof image}; pass ImageData, {data: Uint8Array, width, height, channels} or {data: Float32Array, dims}`,
    );
  }
  if (image.data instanceof Float32Array) {
    const dims = Array.from(image.dims ?? []);
    if (![3, 4].includes(dims.length) || dims.some((d) => !Number.isInteger(d) || d < 1) || dims.reduce((a, b) => a * b, 1) !== image.data.length) {
      throw new InputError(`preprocessed image ${i} needs dims [C, H, W] or [B, C, H, W] matching its ${image.data.length} values, got [${dims}]`);
    }
    return { kind: INPUT_IMAGES, dims: dims.length === 3 ? [1, ...dims] : dims, data: image.data };
  }
  if (!(image.data instanceof Uint8Array || image.data instanceof Uint8ClampedArray)) {
    throw new InputError(`image ${i} holds ${image.data.constructor.name}; pixels are bytes (Uint8Array, Uint8ClampedArray), preprocessed images Float32Array`);
  }
  const { width, height } = image;
  if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1) {
    throw new InputError(`image ${i} is ${width}x${height}; an image needs a width and height of at least 1 pixel`);
  }
  const channels = image.channels ?? image.data.length / (width * height);
  if (![1, 3, 4].includes(channels) || image.data.length !== width * height * channels) {
    throw new InputError(
      `image ${i} has ${image.data.length} bytes for ${width}x${height} pixels (${+(image.data.length / (width * height)).toFixed(2)} per pixel); ` +
        'give 1 (grey), 3 (RGB) or 4 (RGBA) bytes per pixel, row by row',
    );
  }
  return { kind: INPUT_PIXELS, dims: [1, height, width, channels], data: image.data };
}

/**
 * @typedef {{label: string, probability: number, distance: number}} Candidate
 * @typedef {{label: string, probability: number, distance: number, unknown: boolean, topK: Candidate[]}} Prediction
 */

/** Enrol classes from a few images and classify new ones, without backprop. */
export class FewShotClassifier {
  /**
   * Open a model. Use `create` from the package's entry point (Node or browser), which
   * supplies ONNX Runtime and reads the model file.
   * @param {any} ort the onnxruntime-node or onnxruntime-web module
   * @param {Uint8Array} bytes the .onnx file
   * @param {object} [options]
   * @param {string} [options.source] the model's name in messages
   * @param {string[]} [options.executionProviders] default ['cpu'] in Node, ['wasm'] in browsers
   * @param {number|null} [options.threshold] open-set distance threshold; undefined: the model's default; null: no unknown verdicts
   * @param {boolean} [options.keepEmbeddings] keep every enrolled embedding in the store
   * @param {number} [options.batchSize] images per graph call (64)
   * @param {object} [options.sessionOptions] more ONNX Runtime session options
   */
  static async open(ort, bytes, options = {}) {
    const source = options.source ?? 'model';
    const metadata = modelMetadata(bytes, source);
    const sessionOptions = {
      executionProviders: options.executionProviders,
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3, // errors only: ONNX Runtime warns on every load about the overridable inputs
      ...options.sessionOptions,
    };
    const session = await ort.InferenceSession.create(bytes, sessionOptions);
    try {
      const clf = new FewShotClassifier(ort, session, metadata, source, options);
      await clf._findLogitScale();
      return clf;
    } catch (e) {
      await session.release?.(); // a refused model holds no native memory
      throw e;
    }
  }

  constructor(ort, session, metadata, source, options) {
    this.ort = ort;
    this.session = session;
    this.metadata = metadata;
    this.source = source;
    this.batchSize = options.batchSize ?? 64;
    if (!Number.isInteger(this.batchSize) || this.batchSize < 1) throw new InputError(`batchSize must be an integer >= 1, got ${options.batchSize}`);
    const names = new Set(session.inputNames);
    const missing = [INPUT_PROTOTYPES].filter((n) => !names.has(n));
    if (!names.has(INPUT_PIXELS) && !names.has(INPUT_IMAGES)) missing.push(`${INPUT_PIXELS}' or '${INPUT_IMAGES}`);
    missing.push(...[OUTPUT_EMBEDDINGS, OUTPUT_LOGITS].filter((n) => !session.outputNames.includes(n)));
    if (missing.length) {
      throw new ModelMismatchError(`${source} is not an edgemeta model: missing '${missing.join("', '")}'; export it with \`edgemeta export\``);
    }
    /** Whether the model takes raw pixels (exported with the `pixels` entry). */
    this.hasPixels = names.has(INPUT_PIXELS);
    // edgemeta's exports (fp16 ones too) take and give float32; a graph with float16 inputs or
    // outputs comes from elsewhere and is refused rather than fed or read as the wrong numbers
    const types = [...(session.inputMetadata ?? []), ...(session.outputMetadata ?? [])]
      .filter((m) => m.name !== INPUT_PIXELS && m.type && !['float32', 'float64'].includes(m.type));
    if (types.length) {
      throw new ModelMismatchError(
        `${source} has ${types.map((m) => `'${m.name}' as ${m.type}`).join(', ')}; this runtime feeds and reads float32: ` +
          'export the model with `edgemeta export` (fp16 exports keep float32 inputs and outputs)',
      );
    }
    this.store = this._newStore(options.keepEmbeddings);
    this._threshold = options.threshold === undefined ? this.defaultThreshold() : this._checkThreshold(options.threshold);
    this._queue = Promise.resolve(); // one graph call at a time: a web session refuses concurrent runs
  }

  /** The backends ONNX Runtime was asked for. */
  get executionProviders() {
    return this._providers ?? [];
  }

  get fingerprint() {
    return this.metadata.fingerprint;
  }

  get embeddingDim() {
    return this.metadata.embeddingDim;
  }

  get metric() {
    return this.metadata.metric;
  }

  /** Class labels in enrolment order. */
  get labels() {
    return this.store.labels;
  }

  /** Label -> number of enrolled examples. */
  get counts() {
    return this.store.counts;
  }

  /** The open-set distance threshold in use (null: no unknown verdicts). */
  get threshold() {
    return this._threshold;
  }

  set threshold(value) {
    this._threshold = this._checkThreshold(value);
  }

  _checkThreshold(value) {
    if (value !== null && !(typeof value === 'number' && Number.isFinite(value) && value >= 0)) {
      throw new InputError(`threshold must be a finite distance >= 0 or null, got ${value}`);
    }
    return value;
  }

  /** The model's default open-set threshold, by the Python runtime's rules. */
  defaultThreshold() {
    const given = this.metadata.extra.open_set_threshold;
    if (typeof given === 'number' && given >= 0) return given;
    if (this.metric === 'cosine') return 0.5;
    if (['l2', 'centered_l2'].includes(this.metadata.normalization)) return 1.0;
    return null;
  }

  _newStore(keep) {
    return new PrototypeStore({ embeddingDim: this.embeddingDim, metric: this.metric, fingerprint: this.fingerprint, keepEmbeddings: keep });
  }

  /** Replace the enrolled classes by `store`'s, after checking it comes from this model. */
  useStore(store) {
    if (!(store instanceof PrototypeStore)) throw new InputError('useStore() takes a PrototypeStore; read a file with loadBytes() or load()');
    store.claim(this.fingerprint, this.embeddingDim, this.metric);
    this.store = store;
  }

  /** The store file's bytes (the format the Python runtime saves and loads). */
  async saveBytes() {
    return this.store.toBytes();
  }

  /** Replace the enrolled classes by those of a store file's bytes; nothing changes if they are refused. */
  async loadBytes(bytes, { source = 'store' } = {}) {
    const store = await PrototypeStore.fromBytes(bytes, { source, fingerprint: this.fingerprint });
    this.useStore(store);
    return this;
  }

  _run(feeds, names) {
    const next = this._queue.then(() => this.session.run(feeds, names));
    this._queue = next.catch(() => undefined);
    return next;
  }

  _float(tensor) {
    return tensor.data instanceof Float32Array ? tensor.data : Float32Array.from(tensor.data); // a double output
  }

  /**
   * Group images into graph calls: raw images of one size and channel count go together
   * (pixels is [B, H, W, C]), preprocessed tensors together; at most batchSize per call.
   */
  _groups(images) {
    const list = Array.isArray(images) ? images : [images];
    if (list.length === 0) throw new InputError('no images given; pass at least one image');
    const items = list.map(describe);
    const raw = items.findIndex((x) => x.kind === INPUT_PIXELS);
    if (raw >= 0 && !this.hasPixels) {
      throw new InputError(`${this.source} has no 'pixels' input (an export from before raw pixels went into the graph), so it cannot take image ${raw} as bytes; ${PIXELS_EXPORT}`);
    }
    const pre = items.findIndex((x) => x.kind === INPUT_IMAGES);
    if (pre >= 0 && this.hasPixels) {
      throw new InputError(`image ${pre} is a preprocessed float tensor, but ${this.source} takes raw pixels; pass the decoded image (ImageData or bytes)`);
    }
    const { size, channels } = this.metadata.preprocess;
    const open = new Map(); // input shape -> the group being filled
    const groups = [];
    items.forEach((x, i) => {
      if (x.kind === INPUT_IMAGES && (x.dims[1] !== channels || x.dims[2] !== size[0] || x.dims[3] !== size[1])) {
        throw new InputError(`preprocessed image ${i} has dims [${x.dims}], the model takes [batch, ${channels}, ${size[0]}, ${size[1]}]`);
      }
      const key = x.kind === INPUT_PIXELS ? x.dims.slice(1).join('x') : INPUT_IMAGES;
      let g = open.get(key);
      if (!g || g.count + x.dims[0] > this.batchSize) {
        g = { kind: x.kind, per: x.dims.slice(1), parts: [], places: [], count: 0 };
        open.set(key, g);
        groups.push(g);
      }
      g.parts.push(x.data);
      g.places.push([i, g.count, x.dims[0]]); // image i: rows count..count+n of this call
      g.count += x.dims[0];
    });
    return { groups, items };
  }

  async _forward(images, prototypes, classes) {
    const { groups, items } = this._groups(images);
    const d = this.embeddingDim;
    const starts = [];
    let at = 0;
    for (const x of items) {
      starts.push(at);
      at += x.dims[0];
    }
    const embeddings = new Float32Array(at * d);
    const logits = new Float32Array(at * classes);
    const protos = new this.ort.Tensor('float32', prototypes, [classes, d]);
    for (const g of groups) {
      const per = g.per.reduce((a, b) => a * b, 1);
      const data = g.kind === INPUT_PIXELS ? new Uint8Array(g.count * per) : new Float32Array(g.count * per);
      let off = 0;
      for (const p of g.parts) {
        data.set(p, off);
        off += p.length;
      }
      const input = g.kind === INPUT_PIXELS ? new this.ort.Tensor('uint8', data, [g.count, ...g.per]) : new this.ort.Tensor('float32', data, [g.count, ...g.per]);
      const out = await this._run({ [g.kind]: input, [INPUT_PROTOTYPES]: protos }, classes ? [OUTPUT_EMBEDDINGS, OUTPUT_LOGITS] : [OUTPUT_EMBEDDINGS]);
      const emb = this._float(out[OUTPUT_EMBEDDINGS]);
      const lg = classes ? this._float(out[OUTPUT_LOGITS]) : null;
      for (const [i, row, n] of g.places) {
        embeddings.set(emb.subarray(row * d, (row + n) * d), starts[i] * d);
        if (lg) logits.set(lg.subarray(row * classes, (row + n) * classes), starts[i] * classes);
      }
    }
    return { embeddings, logits, count: at };
  }

  /**
   * Embeddings of images, float32 [n * D] (n images, D = embeddingDim).
   * @param {any} images one image or an array (see the README for the accepted kinds)
   */
  async embed(images) {
    return (await this._forward(images, new Float32Array(0), 0)).embeddings;
  }

  /**
   * Embeddings and logits against the enrolled classes: `{embeddings, logits, count, labels}`,
   * logits float32 [count * labels.length] (the graph's, as Python's Session.run gives them).
   */
  async scores(images) {
    const labels = this.store.labels;
    if (!labels.length) throw new InputError('nothing is enrolled yet; call enroll(label, images) for at least one class first');
    const out = await this._forward(images, this.store.prototypes(), labels.length);
    return { ...out, labels };
  }

  /**
   * Add images of class `label` (new or existing); returns its example count. Every image is
   * embedded before the store changes, so a bad image leaves the store as it was.
   */
  async enroll(label, images) {
    label = checkLabel(label);
    const embeddings = await this.embed(images);
    return this.store.add(label, embeddings);
  }

  forget(label) {
    this.store.forget(label);
  }

  rename(oldLabel, newLabel, options) {
    this.store.rename(oldLabel, newLabel, options);
  }

  /** Graph logits -> distances: -logit (squared euclidean) or 1 - logit/scale (cosine). */
  distance(logit) {
    return this.metric === 'cosine' ? 1 - logit / this._scale : -logit;
  }

  /**
   * Classify images; one prediction per image, in order: the nearest class, its probability
   * (a softmax over every enrolled class), its distance, whether it is unknown (distance over
   * the threshold), and the best `topK` classes.
   * @param {any} images
   * @param {{topK?: number}} [options]
   * @returns {Promise<Prediction[]>}
   */
  async predict(images, { topK = 1 } = {}) {
    if (!Number.isInteger(topK) || topK < 1) throw new InputError(`topK must be an integer >= 1, got ${topK}`);
    const { logits, count, labels } = await this.scores(images);
    const c = labels.length;
    const k = Math.min(topK, c);
    const threshold = this._threshold;
    const out = [];
    for (let b = 0; b < count; b++) {
      const row = logits.subarray(b * c, (b + 1) * c);
      const order = Array.from(row.keys()).sort((x, y) => row[y] - row[x] || x - y).slice(0, k); // ties in class order, as Python
      const best = row[order[0]];
      let denom = 0;
      for (let j = 0; j < c; j++) denom += Math.exp(row[j] - best);
      const cands = order.map((j) => ({ label: labels[j], probability: Math.exp(row[j] - best) / denom, distance: this.distance(row[j]) }));
      const first = cands[0];
      out.push({ ...first, unknown: threshold !== null && first.distance > threshold, topK: cands });
    }
    return out;
  }

  /** Cosine models: logits are scale * cos; read the scale, or measure it once (an image against itself). */
  async _findLogitScale() {
    this._scale = 1;
    if (this.metric !== 'cosine') return;
    const given = this.metadata.extra.logit_scale;
    if (typeof given === 'number' && given > 0) {
      this._scale = given;
      return;
    }
    const { size, channels } = this.metadata.preprocess;
    const n = size[0] * size[1] * channels;
    const probe = this.hasPixels
      ? { data: Uint8Array.from({ length: n }, (_, i) => (i * 37) % 251), width: size[1], height: size[0], channels }
      : { data: Float32Array.from({ length: n }, (_, i) => ((i * 37) % 251) / 125 - 1), dims: [channels, size[0], size[1]] };
    const emb = await this.embed(probe);
    const { logits } = await this._forward(probe, emb, 1);
    if (!(logits[0] > 0)) throw new ModelMismatchError(`${this.source}: cannot measure the cosine logit scale; re-export the model`);
    this._scale = logits[0];
  }
}
