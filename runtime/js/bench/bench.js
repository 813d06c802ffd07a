#!/usr/bin/env node
// Batch-1 predict latency of the JavaScript runtime in Node (onnxruntime-node) and in headless
// Chromium (onnxruntime-web, WebAssembly, as many threads as the page is allowed), beside the
// Python runtime's, for the same model, the same enrolled classes and the same decoded frame.
//
//   node bench/bench.js --model MODEL.onnx [--model MODEL2.onnx] [--iterations 300]
//
// Run from runtime/js (`npm run bench -- --model ...`); needs the repository's Python
// environment (.venv, or EDGEMETA_PYTHON) and the Omniglot data (EDGEMETA_DATA_DIR). Prints a
// Markdown table; figures vary with the machine and its load.
import { mkdtempSync } from 'node:fs';
import { createRequire } from 'node:module';
import { cpus, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { startServer } from '../../../examples/web/serve.js';
import { create } from '../src/node.js';
import { HERE as TESTS, python, readSafetensorsFile, runPython } from '../test/support.js';
import { launch } from '../test/chromium.js';

const ORT_NODE = createRequire(import.meta.url)('onnxruntime-node/package.json').version;
const args = process.argv.slice(2);
const models = args.flatMap((a, i) => (a === '--model' ? [resolve(process.env.INIT_CWD ?? process.cwd(), args[i + 1])] : []));
const iterations = Number(args[args.indexOf('--iterations') + 1] || 300);
if (!models.length || !python()) {
  console.error('usage: node bench/bench.js --model MODEL.onnx [--iterations N]  (needs the repository\'s Python environment)');
  process.exit(1);
}

function stats(times) {
  const s = [...times].sort((a, b) => a - b);
  return { median_ms: s[Math.floor(s.length / 2)], p90_ms: s[Math.floor(s.length * 0.9)] };
}

/** The frames as the model takes them: decoded bytes, or (no pixels entry) Python-preprocessed tensors. */
function framesFor(hasPixels, t) {
  const n = t.pixels.shape[0];
  return Array.from({ length: n }, (_, i) => {
    if (hasPixels) {
      const [, h, w, c] = t.pixels.shape;
      return { data: t.pixels.data.slice(i * h * w * c, (i + 1) * h * w * c), width: w, height: h, channels: c };
    }
    const [, c, h, w] = t.preprocessed.shape;
    return { data: t.preprocessed.data.slice(i * c * h * w, (i + 1) * c * h * w), dims: [c, h, w] };
  });
}

async function node(model, t, py) {
  const clf = await create(model);
  const frames = framesFor(clf.hasPixels, t);
  for (const [i, label] of py.labels.entries()) await clf.enroll(label, frames.slice(i * py.shots, (i + 1) * py.shots));
  const query = frames.at(-1);
  const label = (await clf.predict(query))[0].label;
  for (let i = 0; i < Math.max(10, iterations / 10); i++) await clf.predict(query);
  const times = [];
  for (let i = 0; i < iterations; i++) {
    const t0 = performance.now();
    await clf.predict(query);
    times.push(performance.now() - t0);
  }
  return { ...stats(times), label, pixels: clf.hasPixels };
}

async function browser(model, t, py, threads) {
  const server = await startServer({ model, port: 0 });
  const chromium = await launch();
  try {
    const page = await chromium.newPage();
    await page.goto(threads ? `${server.url}?threads=${threads}` : server.url);
    await page.waitForFunction(() => document.body.dataset.busy === '0', { timeout: 60000 });
    const frames = { pixels: { shape: t.pixels.shape, data: Array.from(t.pixels.data) }, preprocessed: { shape: t.preprocessed.shape, data: Array.from(t.preprocessed.data) } };
    return await page.evaluate(async (frames, labels, shots, iterations) => {
      const { create, ort } = await import('/edgemeta/web.js');
      const clf = await create(new URL('model.onnx', location.href).href, { executionProviders: ['wasm'] });
      const n = frames.pixels.shape[0];
      const list = Array.from({ length: n }, (_, i) => {
        if (clf.hasPixels) {
          const [, h, w, c] = frames.pixels.shape;
          return { data: Uint8Array.from(frames.pixels.data.slice(i * h * w * c, (i + 1) * h * w * c)), width: w, height: h, channels: c };
        }
        const [, c, h, w] = frames.preprocessed.shape;
        return { data: Float32Array.from(frames.preprocessed.data.slice(i * c * h * w, (i + 1) * c * h * w)), dims: [c, h, w] };
      });
      for (const [i, label] of labels.entries()) await clf.enroll(label, list.slice(i * shots, (i + 1) * shots));
      const query = list.at(-1);
      const label = (await clf.predict(query))[0].label;
      for (let i = 0; i < Math.max(10, iterations / 10); i++) await clf.predict(query);
      const times = [];
      for (let i = 0; i < iterations; i++) {
        const t0 = performance.now();
        await clf.predict(query);
        times.push(performance.now() - t0);
      }
      times.sort((a, b) => a - b);
      return {
        median_ms: times[Math.floor(times.length / 2)], p90_ms: times[Math.floor(times.length * 0.9)], label,
        threads: ort.env.wasm.numThreads, isolated: self.crossOriginIsolated, version: ort.env.versions?.web, browser: navigator.userAgent.match(/Chrome\/[\d.]+/)?.[0],
      };
    }, frames, py.labels, py.shots, iterations);
  } finally {
    await chromium.close();
    await server.close();
  }
}

const f = (x) => x.toFixed(3);
console.log(`| model | runtime | input | batch-1 predict, median ms | p90 ms | label |`);
console.log(`| --- | --- | --- | ---: | ---: | --- |`);
const notes = [];
for (const model of models) {
  const dir = mkdtempSync(join(tmpdir(), 'edgemeta-bench-'));
  const py = JSON.parse(runPython([join(TESTS, '../bench/bench_python.py'), model, dir, String(iterations)]));
  const t = readSafetensorsFile(join(dir, 'frames.safetensors'));
  const nd = await node(model, t, py);
  const browsers = [await browser(model, t, py), await browser(model, t, py, 1)];
  const name = model.split('/').at(-1);
  const input = nd.pixels ? 'uint8 105x105 frame (pixels)' : 'preprocessed float32 (images)';
  console.log(`| ${name} | Python (onnxruntime ${py.onnxruntime}), predict() | uint8 105x105 frame | ${f(py.predict.median_ms)} | ${f(py.predict.p90_ms)} | ${py.label} |`);
  console.log(`| ${name} | Python, model call alone (Session.run) | preprocessed float32 | ${f(py.model_call.median_ms)} | ${f(py.model_call.p90_ms)} | |`);
  console.log(`| ${name} | Node ${process.version} (onnxruntime-node ${ORT_NODE}), predict() | ${input} | ${f(nd.median_ms)} | ${f(nd.p90_ms)} | ${nd.label} |`);
  for (const br of browsers) {
    console.log(`| ${name} | ${br.browser} headless (onnxruntime-web ${br.version}, wasm, ${br.threads} thread(s)) | ${input} | ${f(br.median_ms)} | ${f(br.p90_ms)} | ${br.label} |`);
  }
  notes.push(`${name}: cross-origin isolated page: ${browsers[0].isolated}`);
}
console.log(`\n${iterations} timed calls each after a warm-up; ${cpus().length} CPU(s) (${cpus()[0]?.model ?? 'unknown'}); ${notes.join('; ')}`);
