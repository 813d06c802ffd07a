// The browser entry point: onnxruntime-web (WebAssembly; WebGPU where the page asks for it).
// Import maps or a bundler resolve 'onnxruntime-web'; set ort.env.wasm.wasmPaths to where
// its .wasm files are served before the first create().
import * as ort from 'onnxruntime-web';
import { FewShotClassifier } from './classifier.js';
import { InputError } from './errors.js';

export * from './core.js';
export { ort };

/**
 * Open an exported edgemeta model (a URL, a File/Blob, or the .onnx bytes) on onnxruntime-web.
 * @param {string|URL|Blob|ArrayBuffer|Uint8Array} model
 * @param {object} [options] see FewShotClassifier.open; executionProviders default ['wasm']
 */
export async function create(model, options = {}) {
  let bytes;
  let source = options.source ?? 'model';
  if (typeof model === 'string' || model instanceof URL) {
    const res = await fetch(model);
    if (!res.ok) throw new InputError(`cannot fetch model ${model} (HTTP ${res.status}); check the URL`);
    bytes = new Uint8Array(await res.arrayBuffer());
    source = options.source ?? String(model);
  } else if (typeof Blob !== 'undefined' && model instanceof Blob) {
    bytes = new Uint8Array(await model.arrayBuffer());
    source = options.source ?? model.name ?? source;
  } else if (model instanceof ArrayBuffer || model instanceof Uint8Array) {
    bytes = model instanceof Uint8Array ? model : new Uint8Array(model);
  } else {
    throw new InputError('create() takes a model URL, a File or Blob, or the .onnx bytes');
  }
  const providers = options.executionProviders ?? ['wasm'];
  const clf = await FewShotClassifier.open(ort, bytes, { ...options, source, executionProviders: providers });
  clf._providers = providers;
  return clf;
}
