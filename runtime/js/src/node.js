// The Node entry point: onnxruntime-node, models and stores as files.
import { open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { FewShotClassifier } from './classifier.js';
import { InputError, StoreWriteError } from './errors.js';
import { HEADER_KEY, PrototypeStore } from './store.js';

export * from './core.js';
export { ort };

async function readBytes(path, what, hint) {
  try {
    return new Uint8Array(await readFile(path));
  } catch (e) {
    if (e.code === 'ENOENT') throw new InputError(`${what} not found: ${path}; ${hint}`);
    if (e.code === 'EISDIR') throw new InputError(`${path} is a folder, not a ${what}`);
    throw new InputError(`cannot read ${what} ${path} (${e.message})`);
  }
}

/**
 * Open an exported edgemeta model (a path or the .onnx bytes) on onnxruntime-node.
 * @param {string|Uint8Array} model
 * @param {object} [options] see FewShotClassifier.open; executionProviders default ['cpu']
 * @returns {Promise<FewShotClassifier>}
 */
export async function create(model, options = {}) {
  const bytes = typeof model === 'string' ? await readBytes(model, 'model file', 'export one with `edgemeta export`') : model;
  const source = options.source ?? (typeof model === 'string' ? model : 'model');
  const providers = options.executionProviders ?? ['cpu'];
  const clf = await FewShotClassifier.open(ort, bytes, { ...options, source, executionProviders: providers });
  clf._providers = providers;
  return clf;
}

/** Read a store file (verified; with `fingerprint`, it must come from that model). */
export async function loadStore(path, { fingerprint } = {}) {
  const bytes = await readBytes(path, 'store file', 'enrol classes first to create it');
  return PrototypeStore.fromBytes(bytes, { source: path, fingerprint });
}

/** Whether an existing file may be replaced by a store: it is empty or a store (damaged or not). */
async function refuseOtherFile(path) {
  let st;
  try {
    st = await stat(path);
  } catch {
    return;
  }
  if (st.isDirectory()) throw new InputError(`${path} is a folder; give a store file path such as ${join(path, 'store.safetensors')}`);
  if (!st.isFile()) throw new InputError(`${path} exists and is not a regular file; save the store to another path`);
  if (st.size === 0) return;
  const f = await open(path, 'r');
  try {
    const head = Buffer.alloc(8 + (1 << 16));
    const { bytesRead } = await f.read(head, 0, head.length, 0);
    if (!head.subarray(8, bytesRead).toString('utf8').includes(`"${HEADER_KEY}"`)) {
      throw new InputError(`${path} exists and is not an edgemeta store (a model, an image, ...); save the store to another path, or remove that file first`);
    }
  } finally {
    await f.close();
  }
}

/**
 * Write store bytes atomically (temp file beside it, fsync, rename): a reader sees the old
 * file or the new one, never a mix, and a failed write leaves the old file as it was.
 */
export async function saveStore(store, path) {
  await refuseOtherFile(path);
  const data = await store.toBytes();
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${Date.now()}.tmp`);
  try {
    const f = await open(tmp, 'wx', 0o644);
    try {
      await f.writeFile(data);
      await f.sync();
    } finally {
      await f.close();
    }
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => undefined);
    if (e.code === 'ENOENT') throw new InputError(`folder ${dirname(path)} does not exist; create it first`);
    throw new StoreWriteError(`could not save the store to ${path} (${e.message}); the previous file is unchanged - free space or fix permissions and retry`);
  }
  return path;
}

/** Save the classifier's classes to a store file (atomically). */
FewShotClassifier.prototype.save = function save(path) {
  return saveStore(this.store, path);
};

/** Replace the classifier's classes by a store file's (made with this model); nothing changes if it is refused. */
FewShotClassifier.prototype.load = async function load(path) {
  this.useStore(await loadStore(path, { fingerprint: this.fingerprint }));
  return this;
};
