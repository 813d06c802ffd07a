// Parity with the Python runtime: the same model, the same store and the same images give
// the same labels (>= 99.9% of 1,000 Omniglot queries) and logits within 1e-4 (fp32), and a
// store written by either runtime is read by the other.
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { PrototypeStore, create, loadStore } from '../src/node.js';
import { fixtures, parityUnavailable, readSafetensorsFile, runPython } from './support.js';

const skip = parityUnavailable();
if (skip) console.log(`# parity tests skipped: ${skip}`);

describe('parity with the Python runtime', { skip: skip ?? false }, () => {
  let fx, images, expected, logits, clf;

  /** Image i as this model takes it: decoded bytes (pixels entry) or the Python-preprocessed tensor. */
  const image = (i) => {
    if (clf.hasPixels) {
      const [, h, w, c] = images.pixels.shape;
      return { data: images.pixels.data.subarray(i * h * w * c, (i + 1) * h * w * c), width: w, height: h, channels: c };
    }
    const [, c, h, w] = images.preprocessed.shape;
    return { data: images.preprocessed.data.subarray(i * c * h * w, (i + 1) * c * h * w), dims: [c, h, w] };
  };
  const shotsOf = (c) => Array.from(images.shots.data.subarray(c * expected.shots, (c + 1) * expected.shots), (i) => image(Number(i)));
  const queries = () => Array.from(images.queries.data, (i) => image(Number(i)));

  before(async () => {
    fx = fixtures();
    images = readSafetensorsFile(join(fx.dir, 'images.safetensors'));
    logits = readSafetensorsFile(join(fx.dir, 'expected.safetensors')).logits.data;
    expected = JSON.parse(readFileSync(join(fx.dir, 'expected.json'), 'utf8'));
    clf = await create(fx.model);
    for (const [c, label] of expected.labels.entries()) await clf.enroll(label, shotsOf(c));
  });

  test('enrolling the same shots gives the store Python made', async () => {
    const py = await loadStore(join(fx.dir, 'py.store'));
    assert.deepEqual(clf.labels, py.labels);
    assert.deepEqual(clf.counts, py.counts);
    const a = clf.store.prototypes();
    const b = py.prototypes();
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i])));
    assert.ok(worst <= 1e-4, `prototypes differ by ${worst}`);
  });

  test('>= 99.9% of 1,000 queries get the label Python gives, logits within 1e-4', async () => {
    await clf.loadBytes(readFileSync(join(fx.dir, 'py.store')), { source: 'py.store' });
    const q = queries();
    assert.equal(q.length, 1000);
    const preds = await clf.predict(q, { topK: 3 });
    const same = preds.filter((p, i) => p.label === expected.predictions[i].label).length;
    assert.ok(same / q.length >= 0.999, `${same} of ${q.length} labels agree`);
    const got = (await clf.scores(q)).logits;
    assert.equal(got.length, logits.length);
    let worst = 0;
    for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i] - logits[i]));
    assert.ok(worst <= 1e-4, `logits differ by up to ${worst}`);
    const unknown = preds.filter((p, i) => p.unknown === expected.predictions[i].unknown).length;
    assert.ok(unknown / q.length >= 0.999, `${unknown} unknown verdicts agree`);
    for (const [i, p] of preds.entries()) {
      const e = expected.predictions[i];
      if (p.label !== e.label) continue;
      assert.ok(Math.abs(p.probability - e.probability) <= 1e-4, `query ${i}: probability ${p.probability} vs ${e.probability}`);
      assert.ok(Math.abs(p.distance - e.distance) <= 1e-4 * Math.max(1, Math.abs(e.distance)), `query ${i}: distance ${p.distance} vs ${e.distance}`);
      assert.deepEqual(p.topK.map((x) => x.label), e.top_k.map((x) => x.label).slice(0, p.topK.length));
    }
    const correct = preds.filter((p, i) => p.label === expected.truth[i]).length;
    assert.ok(correct / q.length > 0.9, `accuracy ${correct / q.length}: the model or the images are wrong`);
  });

  test('Python reads a store the JavaScript runtime wrote, and predicts the same with it', async () => {
    const path = join(fx.dir, 'js.store');
    const store = clf.store;
    store.rename(expected.labels[0], 'café'.normalize('NFD')); // stored composed, as Python stores it
    await clf.save(path);
    const script = `
import json, sys
import numpy as np
from edgemeta.runtime import FewShotClassifier, PrototypeStore
from safetensors.numpy import load_file
s = PrototypeStore.load(sys.argv[1])
clf = FewShotClassifier(sys.argv[2], "cpu", store=s)
im = load_file(sys.argv[3])
qs = list(im["pixels"][im["queries"], :, :, 0])
print(json.dumps({"labels": s.labels, "counts": s.counts, "sums": s.sums().ravel().tolist(), "fingerprint": s.fingerprint,
                  "predicted": [p.label for p in clf.predict(qs)]}))`;
    const py = JSON.parse(runPython(['-c', script, path, fx.model, join(fx.dir, 'images.safetensors')]));
    assert.deepEqual(py.labels, store.labels);
    assert.equal(py.labels[0], 'café'.normalize('NFC'));
    assert.deepEqual(py.counts, store.counts);
    assert.equal(py.fingerprint, clf.fingerprint);
    const sums = [];
    for (const l of store.labels) sums.push(...store._classes.get(l).sum);
    assert.deepEqual(py.sums, sums); // float64 sums, bit for bit through the file
    const js = await clf.predict(queries());
    const same = js.filter((p, i) => p.label === py.predicted[i]).length;
    assert.ok(same / js.length >= 0.999, `${same} of ${js.length} labels agree`);
  });

  test('a store that keeps embeddings round-trips between the runtimes', async () => {
    const store = new PrototypeStore({ embeddingDim: clf.embeddingDim, fingerprint: clf.fingerprint, keepEmbeddings: true });
    store.add('x', await clf.embed(shotsOf(0)));
    store.add('y', await clf.embed(shotsOf(1).slice(0, 2)));
    const path = join(fx.dir, 'keep.store');
    writeFileSync(path, await store.toBytes());
    const script = `
import sys
from edgemeta.runtime import PrototypeStore
s = PrototypeStore.load(sys.argv[1])
s.rename("x", "z")
s.save(sys.argv[1])
print(s.examples().shape, s.counts)`;
    assert.equal(runPython(['-c', script, path]).trim(), "(7, 64) {'z': 5, 'y': 2}");
    const back = await loadStore(path);
    assert.deepEqual(back.counts, { z: 5, y: 2 });
    assert.deepEqual(Array.from(back.examples()), Array.from(store.examples()));
  });
});
