// Bad input to the classifier: one clear error, and nothing enrolled or loaded changes.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { PrototypeStore, create } from '../src/node.js';
import { fixtures, parityUnavailable } from './support.js';

const skip = parityUnavailable();

describe('bad input to the classifier', { skip: skip ?? false }, () => {
  let fx, clf, good;

  before(async () => {
    fx = fixtures();
    clf = await create(fx.model);
    const [h, w] = clf.metadata.preprocess.size;
    good = clf.hasPixels
      ? { data: new Uint8Array(40 * 30 * 4).fill(200), width: 40, height: 30 }
      : { data: new Float32Array(h * w), dims: [1, h, w] };
    await clf.enroll('a', good);
  });

  test('a frame with the wrong number of channels or no pixels is refused, and nothing is enrolled', async () => {
    for (const [image, message] of [
      [{ data: new Uint8Array(10 * 10 * 2), width: 10, height: 10 }, /200 bytes for 10x10 pixels \(2 per pixel\); give 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)/],
      [{ data: new Uint8Array(0), width: 0, height: 10 }, /is 0x10; an image needs a width and height of at least 1 pixel/],
      [{ data: new Uint8Array(12), width: 2, height: 2, channels: 2 }, /give 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)/],
      [{ data: new Int16Array(4), width: 2, height: 2 }, /holds Int16Array; pixels are bytes/],
      [null, /image 1 is null/],
    ]) {
      await assert.rejects(clf.enroll('b', [good, image]), { name: 'InputError', message });
    }
    await assert.rejects(clf.enroll('b', []), { name: 'InputError', message: /no images given/ });
    await assert.rejects(clf.predict(good, { topK: 0 }), { name: 'InputError', message: /topK must be an integer >= 1/ });
    assert.deepEqual(clf.counts, { a: 1 });
  });

  test('raw bytes to a model without the pixels entry name the export command that adds it', async () => {
    const older = await create(fx.older);
    assert.equal(older.hasPixels, false);
    const [h, w] = older.metadata.preprocess.size;
    await older.enroll('a', { data: new Float32Array(h * w), dims: [1, h, w] }); // preprocessed tensors still work
    await assert.rejects(older.predict({ data: new Uint8Array(16), width: 4, height: 4 }), {
      name: 'InputError',
      message: /model-images\.onnx has no 'pixels' input .*`edgemeta export CHECKPOINT -o MODEL\.onnx`/,
    });
    assert.deepEqual(older.counts, { a: 1 });
  });

  test('a model with the pixels entry refuses preprocessed tensors (JS cannot feed its images input)', async (t) => {
    if (!clf.hasPixels) return t.skip('this checkout exports no pixels entry');
    const [h, w] = clf.metadata.preprocess.size;
    await assert.rejects(clf.predict({ data: new Float32Array(h * w), dims: [1, h, w] }), { name: 'InputError', message: /takes raw pixels; pass the decoded image/ });
  });

  test('a store from another model or a truncated store file is refused, and the classes stay', async () => {
    const other = new PrototypeStore({ embeddingDim: clf.embeddingDim, fingerprint: 'another-model' });
    other.add('z', new Float32Array(clf.embeddingDim));
    await assert.rejects(clf.loadBytes(await other.toBytes()), { name: 'ModelMismatchError', message: /made with model another-model, this model is / });
    const path = join(fx.dir, 'bad-input.store');
    await clf.save(path);
    const bytes = readFileSync(path);
    writeFileSync(path, bytes.subarray(0, bytes.length - 16));
    await assert.rejects(clf.load(path), { name: 'StoreCorruptError', message: /truncated or padded/ });
    await assert.rejects(clf.loadBytes(bytes.subarray(0, 100)), { name: 'StoreCorruptError' });
    assert.deepEqual(clf.labels, ['a']);
    assert.equal((await clf.predict(good))[0].label, 'a');
  });

  test('a model file that is not an edgemeta model is refused with the command that makes one', async () => {
    await assert.rejects(create(join(fx.dir, 'py.store')), { name: 'ModelMismatchError', message: /carries no edgemeta metadata|not an ONNX model|truncated/ });
    await assert.rejects(create(join(fx.dir, 'nothing.onnx')), { name: 'InputError', message: /model file not found: .*`edgemeta export`/ });
  });
});
