// The store file format and its refusals, without a model: every malformed file is one
// StoreCorruptError, and a refused load changes nothing.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { InputError, ModelMismatchError, PrototypeStore, StoreCorruptError, loadStore, saveStore } from '../src/node.js';
import { readTable } from '../src/safetensors.js';

const D = 4;
function sample({ keepEmbeddings = false } = {}) {
  const s = new PrototypeStore({ embeddingDim: D, fingerprint: 'abc123', keepEmbeddings });
  s.add('cat', Float32Array.from([1, 2, 3, 4, 3, 2, 1, 0]));
  s.add('dog', Float32Array.from([0.5, -1, 2, 8]));
  return s;
}

/** The store bytes with its header JSON edited by `edit` and the checksum left as it was. */
async function withHeader(edit) {
  const bytes = await sample().toBytes();
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  const outer = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const header = JSON.parse(outer.__metadata__['edgemeta.store']);
  edit(header);
  outer.__metadata__['edgemeta.store'] = JSON.stringify(header);
  const text = new TextEncoder().encode(JSON.stringify(outer));
  const out = new Uint8Array(8 + text.length + bytes.length - 8 - n);
  new DataView(out.buffer).setBigUint64(0, BigInt(text.length), true);
  out.set(text, 8);
  out.set(bytes.subarray(8 + n), 8 + text.length);
  return out;
}

test('a store round-trips through its bytes: labels, counts, float64 sums, prototypes', async () => {
  const s = sample({ keepEmbeddings: true });
  const back = await PrototypeStore.fromBytes(await s.toBytes(), { fingerprint: 'abc123' });
  assert.deepEqual(back.labels, ['cat', 'dog']);
  assert.deepEqual(back.counts, { cat: 2, dog: 1 });
  assert.deepEqual(Array.from(back.prototypes()), [2, 2, 2, 2, 0.5, -1, 2, 8]);
  assert.deepEqual(Array.from(back.examples()), Array.from(s.examples()));
  assert.equal(back.keepEmbeddings, true);
});

test('the header is written as the Python runtime writes it (sorted keys, its separators)', async () => {
  const bytes = await sample().toBytes();
  const { metadata, headerLength } = readTable(bytes, 's', (w) => new Error(w));
  assert.equal(
    metadata['edgemeta.store'],
    '{"counts": [2, 1], "embedding_dim": 4, "fingerprint": "abc123", "format": "edgemeta.prototype_store", ' +
      '"keep_embeddings": false, "labels": ["cat", "dog"], "metric": "sqeuclidean", "version": 1}',
  );
  assert.equal(headerLength % 8, 0);
  assert.match(metadata.sha256, /^[0-9a-f]{64}$/);
});

test('a flipped byte in a tensor fails the checksum', async () => {
  const bytes = await sample().toBytes();
  bytes[bytes.length - 3] ^= 1;
  await assert.rejects(PrototypeStore.fromBytes(bytes, { source: 'x.store' }), { name: 'StoreCorruptError', message: /x\.store failed its checksum/ });
});

test('a truncated or padded file is refused before its tensors are read', async () => {
  const bytes = await sample().toBytes();
  for (const cut of [0, 7, 20, bytes.length - 1]) {
    await assert.rejects(PrototypeStore.fromBytes(bytes.subarray(0, cut)), StoreCorruptError, `cut at ${cut}`);
  }
  const padded = new Uint8Array(bytes.length + 8);
  padded.set(bytes);
  await assert.rejects(PrototypeStore.fromBytes(padded), { name: 'StoreCorruptError', message: /truncated or padded/ });
});

for (const [what, edit, message] of [
  ['a count that is not an integer', (h) => (h.counts[0] = 2.5), /counts\[0\] must be an integer/],
  ['a boolean dim', (h) => (h.embedding_dim = true), /embedding_dim must be an integer/],
  ['an unknown metric', (h) => (h.metric = 'manhattan'), /metric must be one of/],
  ['an unknown field', (h) => (h.owner = 'me'), /unknown field\(s\) owner/],
  ['a label with a newline', (h) => (h.labels[0] = 'ca\nt'), /labels\[0\] holds control characters/],
  ['a label with a lone surrogate', (h) => (h.labels[0] = 'ca\uDC00t'), /labels\[0\] holds a lone surrogate/],
  ['two spellings of one label', (h) => (h.labels = ['café'.normalize('NFC'), 'café'.normalize('NFD')]), /appears twice/],
  ['labels and counts of different lengths', (h) => h.counts.push(1), /2 labels but 3 counts/],
  ['a newer format version', (h) => (h.version = 2), /newer than this edgemeta reads \(1\); upgrade edgemeta/],
  ['another format', (h) => (h.format = 'something.else'), /is not an edgemeta prototype store/],
  ['keep_embeddings that is not a boolean', (h) => (h.keep_embeddings = 1), /keep_embeddings must be true or false/],
]) {
  test(`a header with ${what} is refused`, async () => {
    await assert.rejects(PrototypeStore.fromBytes(await withHeader(edit)), { name: 'StoreCorruptError', message });
  });
}

test('an edited header that is still well-formed fails the checksum', async () => {
  await assert.rejects(PrototypeStore.fromBytes(await withHeader((h) => (h.labels[1] = 'wolf'))), { name: 'StoreCorruptError', message: /checksum/ });
});

test('a store made with another model is refused with both fingerprints named', async () => {
  await assert.rejects(PrototypeStore.fromBytes(await sample().toBytes(), { fingerprint: 'ffff' }), {
    name: 'ModelMismatchError',
    message: /made with model abc123, this model is ffff; re-enrol or load the matching model/,
  });
  assert.throws(() => sample().claim('abc123', 8, 'sqeuclidean'), ModelMismatchError);
});

test('labels: composed (NFC), no control characters, not empty; unknown labels are named', () => {
  const s = sample();
  s.add('caf\u0065\u0301', new Float32Array(D));
  assert.ok(s.labels.includes('caf\u00e9'));
  assert.equal(s.has('caf\u0065\u0301'), true);
  assert.throws(() => s.add('a\tb', new Float32Array(D)), { name: 'InputError', message: /control characters/ });
  assert.throws(() => s.add('  ', new Float32Array(D)), { name: 'InputError', message: /non-empty/ });
  assert.throws(() => s.add('a\uD800b', new Float32Array(D)), { name: 'InputError', message: /lone surrogate/ });
  s.add('smile \u{1F600}', new Float32Array(D)); // a pair of surrogates is one character, and fine
  s.forget('smile \u{1F600}');
  assert.throws(() => s.add('x', new Float32Array(3)), { name: 'InputError', message: /do not fit \[n, 4\]/ });
  assert.throws(() => s.add('x', Float32Array.from([1, NaN, 0, 0])), { name: 'InputError', message: /finite/ });
  assert.throws(() => s.forget('cow'), { name: 'InputError', message: /unknown label "cow"; enrolled labels: "cat", "dog"/ });
  assert.deepEqual(s.counts, { cat: 2, dog: 1, 'café': 1 });
});

test('rename keeps the row; onto an existing label it needs merge, which adds sums and counts', () => {
  const s = sample();
  s.rename('cat', 'kitten');
  assert.deepEqual(s.labels, ['kitten', 'dog']);
  assert.throws(() => s.rename('dog', 'kitten'), { name: 'InputError', message: /already exists; pass \{merge: true\}/ });
  s.rename('dog', 'kitten', { merge: true });
  assert.deepEqual(s.counts, { kitten: 3 });
  assert.deepEqual(Array.from(s.prototypes()), [(4 + 0.5) / 3, (4 - 1) / 3, (4 + 2) / 3, (4 + 8) / 3].map(Math.fround));
  s.forget('kitten');
  assert.equal(s.size, 0);
});

test('saving never replaces a file that is not a store, and a refused load keeps the old file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'edgemeta-store-'));
  const model = join(dir, 'model.onnx');
  writeFileSync(model, 'not a store at all');
  await assert.rejects(saveStore(sample(), model), { name: 'InputError', message: /is not an edgemeta store/ });
  assert.equal(readFileSync(model, 'utf8'), 'not a store at all');
  const path = join(dir, 'a.store');
  await saveStore(sample(), path);
  const before = readFileSync(path);
  await saveStore(sample(), path); // a store replaces a store
  assert.deepEqual((await loadStore(path)).labels, ['cat', 'dog']);
  writeFileSync(join(dir, 'cut.store'), before.subarray(0, before.length - 5));
  await assert.rejects(loadStore(join(dir, 'cut.store')), StoreCorruptError);
  await assert.rejects(loadStore(join(dir, 'missing.store')), { name: 'InputError', message: /store file not found/ });
  await assert.rejects(saveStore(sample(), join(dir, 'no', 'such', 'x.store')), { name: 'InputError', message: /does not exist; create it first/ });
  assert.throws(() => new PrototypeStore({ embeddingDim: 0 }), InputError);
});
