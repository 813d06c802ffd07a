// Shared by the Node tests: the fixtures that the Python runtime makes (see make_fixtures.py).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
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

let cached = null;
/**
 * Build the fixtures once per test process: EDGEMETA_JS_FIXTURES names a folder made
 * earlier (make_fixtures.py OUT), else they are made in a temporary folder.
 */
export function fixtures() {
  if (cached) return cached;
  let dir = process.env.EDGEMETA_JS_FIXTURES;
  if (!dir || !existsSync(join(dir, 'expected.json'))) {
    dir = dir || mkdtempSync(join(tmpdir(), 'edgemeta-js-'));
    const args = [join(HERE, 'make_fixtures.py'), dir];
    if (process.env.EDGEMETA_JS_MODEL) args.push('--model', process.env.EDGEMETA_JS_MODEL);
    runPython(args);
  }
  cached = { dir, model: process.env.EDGEMETA_JS_MODEL || join(dir, 'model.onnx') };
  return cached;
}

/** The tensors of a safetensors file, by name. */
export function readSafetensorsFile(path) {
  const bytes = new Uint8Array(readFileSync(path));
  const bad = (why) => new Error(`${path}: ${why}`);
  const { table, headerLength } = readTable(bytes, path, bad);
  return readTensors(bytes, table, headerLength, bad);
}
