// Shared by the Node tests: the fixtures that the Python runtime makes (see make_fixtures.py).
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readTable, readTensors } from '../src/safetensors.js';

export const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(HERE, '../../..');

/** The repository's Python (EDGEMETA_PYTHON, else .venv), or null when there is none. */
export function python() {
  const p = process.env.EDGEMETA_PYTHON || join(REPO, '.venv/bin/python');
  return existsSync(p) ? p : null;
}

/** Why the parity tests cannot run here, or null when they can. */
export function parityUnavailable() {
  if (!python()) return `no Python environment at ${join(REPO, '.venv')} (set EDGEMETA_PYTHON); run bash scripts/test.sh`;
  const data = process.env.EDGEMETA_DATA_DIR || join(REPO, '..', 'shared', 'data');
  if (!existsSync(join(data, 'omniglot', 'images_evaluation.zip'))) return `no Omniglot data in ${data} (set EDGEMETA_DATA_DIR)`;
  return null;
}

/** Run Python with the repository's environment; throws with its stderr when it fails. */
export function runPython(args, { input } = {}) {
  const r = spawnSync(python(), args, { encoding: 'utf8', input, cwd: REPO, maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`python ${args.join(' ')} failed:\n${r.stderr}`);
  return r.stdout;
}

/** Where the fixtures live: EDGEMETA_JS_FIXTURES, else runtime/js/.fixtures (made by `npm test`). */
export const FIXTURES = process.env.EDGEMETA_JS_FIXTURES || join(HERE, '..', '.fixtures');

/** Make the fixtures afresh (make_fixtures.py), with EDGEMETA_JS_MODEL as the model when set. */
export function buildFixtures(dir = FIXTURES) {
  rmSync(dir, { recursive: true, force: true });
  const args = [join(HERE, 'make_fixtures.py'), dir];
  if (process.env.EDGEMETA_JS_MODEL) args.push('--model', process.env.EDGEMETA_JS_MODEL);
  runPython(args);
}

/** The fixtures, made now if no earlier run made them (a test file run on its own). */
export function fixtures() {
  if (!existsSync(join(FIXTURES, 'expected.json'))) buildFixtures();
  // older: the same model exported without the pixels entry (as models were before it)
  return { dir: FIXTURES, model: process.env.EDGEMETA_JS_MODEL || join(FIXTURES, 'model.onnx'), older: join(FIXTURES, 'model-images.onnx') };
}

/** The tensors of a safetensors file, by name. */
export function readSafetensorsFile(path) {
  const bytes = new Uint8Array(readFileSync(path));
  const bad = (why) => new Error(`${path}: ${why}`);
  const { table, headerLength } = readTable(bytes, path, bad);
  return readTensors(bytes, table, headerLength, bad);
}
