// The edgemeta document an exported model carries (ONNX metadata_props["edgemeta"], see
// runtime/spec.py). ONNX Runtime's JavaScript API does not expose a model's custom metadata,
// so it is read from the ModelProto bytes: a walk over the top-level protobuf fields that
// skips the graph without decoding it.

import { ModelMismatchError } from './errors.js';

export const METADATA_KEY = 'edgemeta';
export const METADATA_VERSION = 1;

function varint(bytes, at) {
  let value = 0;
  let shift = 1;
  for (let i = 0; i < 10; i++) {
    const b = bytes[at + i];
    if (b === undefined) throw new ModelMismatchError('the model file is truncated; export it again');
    value += (b & 0x7f) * shift; // arithmetic, not <<: lengths of models over 2 GiB stay exact
    if (b < 0x80) return [value, at + i + 1];
    shift *= 128;
  }
  throw new ModelMismatchError('the model file is not an ONNX model (a malformed varint)');
}

function fields(bytes, begin, end, visit) {
  let at = begin;
  while (at < end) {
    const [key, next] = varint(bytes, at);
    at = next;
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) [, at] = varint(bytes, at);
    else if (wire === 1) at += 8;
    else if (wire === 5) at += 4;
    else if (wire === 2) {
      const [n, start] = varint(bytes, at);
      if (start + n > end) throw new ModelMismatchError('the model file is truncated or not an ONNX model; export it again');
      visit(field, start, start + n);
      at = start + n;
    } else throw new ModelMismatchError(`the model file is not an ONNX model (wire type ${wire}); pass an .onnx file`);
  }
}

/**
 * The metadata_props of an ONNX ModelProto, as a plain object.
 * @param {Uint8Array} bytes the .onnx file
 * @returns {Record<string, string>}
 */
export function readMetadataProps(bytes) {
  const dec = new TextDecoder();
  const props = {};
  fields(bytes, 0, bytes.length, (field, b, e) => {
    if (field !== 14) return; // ModelProto.metadata_props
    let key = '';
    let value = '';
    fields(bytes, b, e, (f, vb, ve) => {
      if (f === 1) key = dec.decode(bytes.subarray(vb, ve));
      if (f === 2) value = dec.decode(bytes.subarray(vb, ve));
    });
    props[key] = value;
  });
  return props;
}

/**
 * @typedef {object} ModelMetadata
 * @property {{size: number[], channels: number, mean: number[], std: number[], interpolation: string, color: string}} preprocess
 * @property {number} embeddingDim
 * @property {'sqeuclidean'|'cosine'} metric
 * @property {'none'|'l2'|'centered_l2'} normalization
 * @property {string} fingerprint
 * @property {string} backbone
 * @property {'fp32'|'fp16'|'int8'} precision
 * @property {number} opset
 * @property {Record<string, any>} extra
 * @property {Record<string, any>} verification
 * @property {number} version
 */

/**
 * Parse the edgemeta metadata document.
 * @param {string} text
 * @returns {ModelMetadata}
 */
export function parseMetadata(text) {
  let d;
  try {
    d = JSON.parse(text);
  } catch (e) {
    throw new ModelMismatchError(`model metadata is not valid JSON (${e.message}); re-export the model with edgemeta`);
  }
  if (d === null || typeof d !== 'object' || d.format !== 'edgemeta.model') {
    throw new ModelMismatchError('model metadata is not an edgemeta document; re-export the model with edgemeta');
  }
  if (!Number.isInteger(d.version) || d.version > METADATA_VERSION) {
    throw new ModelMismatchError(`model metadata version ${d.version} is newer than this edgemeta understands (${METADATA_VERSION}); upgrade edgemeta`);
  }
  const p = d.preprocess;
  const problems = [];
  if (!p || !Array.isArray(p.size) || p.size.length !== 2 || ![1, 3].includes(p.channels)) problems.push('preprocess');
  if (!Number.isInteger(d.embedding_dim) || d.embedding_dim < 1) problems.push('embedding_dim');
  if (!['sqeuclidean', 'cosine'].includes(d.metric)) problems.push('metric');
  if (!['none', 'l2', 'centered_l2'].includes(d.normalization)) problems.push('normalization');
  if (typeof d.fingerprint !== 'string') problems.push('fingerprint');
  if (problems.length) throw new ModelMismatchError(`model metadata is missing or has a bad field (${problems.join(', ')}); re-export the model`);
  return {
    preprocess: p,
    embeddingDim: d.embedding_dim,
    metric: d.metric,
    normalization: d.normalization,
    fingerprint: d.fingerprint,
    backbone: String(d.backbone ?? 'unknown'),
    precision: d.precision ?? 'fp32',
    opset: d.opset ?? 0,
    extra: d.extra ?? {},
    verification: d.verification ?? {},
    version: d.version,
  };
}

/**
 * The edgemeta metadata of an .onnx file's bytes.
 * @param {Uint8Array} bytes
 * @param {string} source
 * @returns {ModelMetadata}
 */
export function modelMetadata(bytes, source) {
  if (bytes.length >= 8 && new TextDecoder().decode(bytes.subarray(4, 8)) === 'ORTM') {
    throw new ModelMismatchError(`${source} is an ONNX Runtime (.ort) model, whose metadata this runtime cannot read; pass the .onnx model it was made from`);
  }
  const props = readMetadataProps(bytes);
  if (!(METADATA_KEY in props)) {
    throw new ModelMismatchError(`${source} carries no edgemeta metadata; export it with \`edgemeta export\` (or \`edgemeta wrap\` for another ONNX model)`);
  }
  return parseMetadata(props[METADATA_KEY]);
}
