// Types of the edgemeta JavaScript runtime (the same for the Node and the browser entry points;
// `save`/`load` with file paths, `loadStore` and `saveStore` exist in Node only).

export class EdgemetaError extends Error {}
/** A user-supplied value (image, label, option) is invalid. */
export class InputError extends EdgemetaError {}
/** Two artefacts (model, store) come from different models, or a file is no edgemeta model. */
export class ModelMismatchError extends EdgemetaError {}
/** A store file is truncated, tampered with, or of an unknown format. */
export class StoreCorruptError extends EdgemetaError {}
/** A store could not be written; the previous file is intact. */
export class StoreWriteError extends EdgemetaError {}

export type Metric = 'sqeuclidean' | 'cosine';

/** Decoded pixels, row by row: ImageData (RGBA), or bytes with 1 (grey), 3 (RGB) or 4 (RGBA) channels. */
export interface PixelImage {
  data: Uint8Array | Uint8ClampedArray;
  width: number;
  height: number;
  /** default: data.length / (width * height) */
  channels?: 1 | 3 | 4;
}

/** A preprocessed float image [C, H, W] or batch [B, C, H, W], for models without the `pixels` entry. */
export interface PreprocessedImage {
  data: Float32Array;
  dims: number[];
}

export type Image = PixelImage | PreprocessedImage;

export interface ModelMetadata {
  preprocess: { size: [number, number]; channels: 1 | 3; mean: number[]; std: number[]; interpolation: string; color: string };
  embeddingDim: number;
  metric: Metric;
  normalization: 'none' | 'l2' | 'centered_l2';
  fingerprint: string;
  backbone: string;
  precision: 'fp32' | 'fp16' | 'int8';
  opset: number;
  extra: Record<string, unknown>;
  verification: Record<string, unknown>;
  version: number;
}

export interface Candidate {
  label: string;
  /** softmax over every enrolled class */
  probability: number;
  /** squared euclidean distance, or 1 - cosine similarity */
  distance: number;
}

export interface Prediction extends Candidate {
  /** the distance is over the open-set threshold: `label` is only the nearest class */
  unknown: boolean;
  topK: Candidate[];
}

export interface ClassifierOptions {
  /** ONNX Runtime execution providers; default ['cpu'] (Node) or ['wasm'] (browser) */
  executionProviders?: string[];
  /** open-set distance threshold; undefined: the model's default; null: no unknown verdicts */
  threshold?: number | null;
  /** keep every enrolled embedding in the store (saved in the file too) */
  keepEmbeddings?: boolean;
  /** images per graph call (64) */
  batchSize?: number;
  /** the model's name in messages */
  source?: string;
  /** more ONNX Runtime session options */
  sessionOptions?: Record<string, unknown>;
}

export class PrototypeStore {
  constructor(options: { embeddingDim: number; metric?: Metric; fingerprint?: string; keepEmbeddings?: boolean });
  readonly embeddingDim: number;
  readonly metric: Metric;
  fingerprint: string;
  readonly keepEmbeddings: boolean;
  readonly labels: string[];
  readonly counts: Record<string, number>;
  readonly size: number;
  has(label: string): boolean;
  /** class means, float32 [C * D] in label order */
  prototypes(): Float32Array;
  /** kept embeddings, float32 [N * D] grouped in label order */
  examples(): Float32Array;
  add(label: string, embeddings: Float32Array): number;
  forget(label: string): void;
  rename(oldLabel: string, newLabel: string, options?: { merge?: boolean }): void;
  claim(fingerprint: string, embeddingDim: number, metric: Metric): void;
  toBytes(): Promise<Uint8Array>;
  static fromBytes(data: Uint8Array | ArrayBuffer, options?: { source?: string; fingerprint?: string }): Promise<PrototypeStore>;
}

export class FewShotClassifier {
  readonly metadata: ModelMetadata;
  readonly source: string;
  /** the model takes raw pixels (exported with the `pixels` entry) */
  readonly hasPixels: boolean;
  readonly fingerprint: string;
  readonly embeddingDim: number;
  readonly metric: Metric;
  readonly executionProviders: string[];
  readonly labels: string[];
  readonly counts: Record<string, number>;
  store: PrototypeStore;
  threshold: number | null;
  defaultThreshold(): number | null;
  embed(images: Image | Image[]): Promise<Float32Array>;
  scores(images: Image | Image[]): Promise<{ embeddings: Float32Array; logits: Float32Array; count: number; labels: string[] }>;
  enroll(label: string, images: Image | Image[]): Promise<number>;
  forget(label: string): void;
  rename(oldLabel: string, newLabel: string, options?: { merge?: boolean }): void;
  predict(images: Image | Image[], options?: { topK?: number }): Promise<Prediction[]>;
  distance(logit: number): number;
  useStore(store: PrototypeStore): void;
  saveBytes(): Promise<Uint8Array>;
  loadBytes(bytes: Uint8Array | ArrayBuffer, options?: { source?: string }): Promise<this>;
  /** Node only: write the store file atomically */
  save(path: string): Promise<string>;
  /** Node only: replace the classes by a store file's */
  load(path: string): Promise<this>;
}

/** Open an exported model: a path or bytes (Node); a URL, File/Blob or bytes (browser). */
export function create(model: string | URL | Blob | ArrayBuffer | Uint8Array, options?: ClassifierOptions): Promise<FewShotClassifier>;
/** Node only */
export function loadStore(path: string, options?: { fingerprint?: string }): Promise<PrototypeStore>;
/** Node only */
export function saveStore(store: PrototypeStore, path: string): Promise<string>;
export function checkLabel(label: unknown): string;
export function modelMetadata(bytes: Uint8Array, source: string): ModelMetadata;
export function parseMetadata(text: string): ModelMetadata;
export function readMetadataProps(bytes: Uint8Array): Record<string, string>;
export const FORMAT_NAME: 'edgemeta.prototype_store';
export const FORMAT_VERSION: number;
export const METADATA_KEY: 'edgemeta';
export const INPUT_PIXELS: 'pixels';
export const INPUT_IMAGES: 'images';
export const PIXELS_EXPORT: string;
/** the onnxruntime-node or onnxruntime-web module in use */
export const ort: any;
