// A minimal, strict safetensors reader and writer (https://github.com/huggingface/safetensors):
// 8 bytes little-endian header length N, N bytes of JSON (tensor table and "__metadata__"
// strings), then the tensors' bytes. Only the dtypes a prototype store uses (and bytes) are supported.

import { StoreCorruptError } from './errors.js';

export const DTYPES = {
  F64: { array: Float64Array, size: 8, numpy: '<f8' },
  F32: { array: Float32Array, size: 4, numpy: '<f4' },
  I64: { array: BigInt64Array, size: 8, numpy: '<i8' },
  U8: { array: Uint8Array, size: 1, numpy: '|u1' },
};

// typed arrays use the platform's byte order and safetensors is little-endian; every platform
// a browser or Node runs on is, but refuse rather than silently write swapped numbers
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const MAX_HEADER = 1 << 28;

function elements(shape) {
  return shape.reduce((a, b) => a * b, 1);
}

/**
 * Parse safetensors bytes.
 * @param {Uint8Array} bytes
 * @param {string} source what the bytes are, for messages
 * @param {(why: string) => Error} bad builds the error for a malformed file
 * @returns {{table: Record<string, {dtype: string, shape: number[], data_offsets: number[]}>,
 *           metadata: Record<string, string>, headerLength: number}}
 */
export function readTable(bytes, source, bad) {
  if (!LITTLE_ENDIAN) throw new StoreCorruptError('this platform is big-endian; safetensors files cannot be read here');
  if (bytes.length < 8) throw bad(`only ${bytes.length} bytes`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (n > bytes.length - 8) throw bad('header runs past the end of the file (truncated)');
  if (n > MAX_HEADER) throw bad(`a ${n}-byte header, over the limit of ${MAX_HEADER}`);
  let outer;
  try {
    outer = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch (e) {
    throw bad(`header: ${e.message}`);
  }
  if (outer === null || typeof outer !== 'object' || Array.isArray(outer)) throw bad('the header is not a JSON object');
  const metadata = outer.__metadata__ ?? {};
  delete outer.__metadata__;
  if (typeof metadata !== 'object' || Array.isArray(metadata) || !Object.values(metadata).every((v) => typeof v === 'string')) {
    throw bad("the safetensors file's __metadata__ must map names to strings");
  }
  return { table: outer, metadata, headerLength: n };
}

/**
 * The tensors of a parsed table, as typed arrays (copies, aligned), after checking that their
 * byte ranges tile the data section exactly.
 * @returns {Record<string, {dtype: string, shape: number[], data: Float64Array|Float32Array|BigInt64Array}>}
 */
export function readTensors(bytes, table, headerLength, bad) {
  const start = 8 + headerLength;
  const dataLength = bytes.length - start;
  const spans = [];
  const out = {};
  for (const [name, info] of Object.entries(table)) {
    const dt = DTYPES[info?.dtype];
    const [b, e] = Array.isArray(info?.data_offsets) ? info.data_offsets : [];
    if (!dt || !Array.isArray(info.shape) || !info.shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw bad(`tensor ${name} has a bad dtype or shape`);
    }
    if (!Number.isInteger(b) || !Number.isInteger(e) || b < 0 || e < b || e > dataLength) {
      throw bad(`tensor ${name} lies outside the file (truncated?)`);
    }
    if (e - b !== elements(info.shape) * dt.size) throw bad(`tensor ${name} holds ${e - b} bytes, not what its shape needs`);
    spans.push([b, e]);
    // a copy (Uint8Array's slice, also for a Node Buffer, whose slice is a view): aligned for
    // the typed array, independent of the file
    const copy = Uint8Array.prototype.slice.call(bytes, start + b, start + e);
    out[name] = { dtype: info.dtype, shape: info.shape, data: new dt.array(copy.buffer, 0, (e - b) / dt.size) };
  }
  spans.sort((x, y) => x[0] - y[0]);
  let at = 0;
  for (const [b, e] of spans) {
    if (b !== at) throw bad('tensor byte ranges overlap or leave gaps');
    at = e;
  }
  if (at !== dataLength) throw bad(`${dataLength - at} bytes after the last tensor`);
  return out;
}

/**
 * Serialize tensors (in the given order) and metadata strings as safetensors bytes; the
 * header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
 * @param {Array<[string, {dtype: string, shape: number[], data: ArrayBufferView}]>} tensors
 * @param {Record<string, string>} metadata
 * @returns {Uint8Array}
 */
export function writeSafetensors(tensors, metadata) {
  if (!LITTLE_ENDIAN) throw new StoreCorruptError('this platform is big-endian; safetensors files cannot be written here');
  const header = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of tensors) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  const text = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(text.length / 8) * 8;
  const out = new Uint8Array(8 + padded + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.fill(0x20, 8, 8 + padded);
  out.set(text, 8);
  let at = 8 + padded;
  for (const [, t] of tensors) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at);
    at += t.data.byteLength;
  }
  return out;
}
