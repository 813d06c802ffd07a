#!/usr/bin/env node
// Serve the example page, the runtime's modules and ONNX Runtime's WebAssembly files on
// 127.0.0.1, with a model:
//
//   node examples/web/serve.js --model model.onnx [--port 8000]
//
// (run `npm ci` in runtime/js once first; `npm run serve -- --model ...` there does the same).
// The page is cross-origin isolated (COOP/COEP headers) so that ONNX Runtime may use
// WebAssembly threads.
import { createReadStream, existsSync, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, extname, join, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
const RUNTIME = resolve(HERE, '../../runtime/js');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.png': 'image/png',
  '.onnx': 'application/octet-stream',
};

/** URL prefix -> folder; a request resolves inside its folder or is refused. */
function routes(model) {
  return [
    ['/edgemeta/', join(RUNTIME, 'src')],
    ['/ort/', join(RUNTIME, 'node_modules/onnxruntime-web/dist')],
    ...(model ? [['/model.onnx', model]] : []),
    ['/', HERE],
  ];
}

function locate(table, pathname) {
  for (const [prefix, target] of table) {
    if (prefix === '/model.onnx') {
      if (pathname === prefix) return target;
      continue;
    }
    if (!pathname.startsWith(prefix)) continue;
    const rel = decodeURIComponent(pathname.slice(prefix.length)) || 'index.html';
    const file = resolve(target, rel);
    if (file !== target && !file.startsWith(target + sep)) return null; // no way out of the folder
    return file;
  }
  return null;
}

/**
 * Start the server; resolves to {url, close}.
 * @param {{model?: string, port?: number, host?: string}} [options]
 */
export function startServer({ model, port = 8000, host = '127.0.0.1' } = {}) {
  // under `npm run serve` the working folder is runtime/js; paths are meant from where npm ran
  if (model) model = resolve(process.env.INIT_CWD ?? process.cwd(), model);
  if (model && !existsSync(model)) throw new Error(`model file not found: ${model}; export one with \`edgemeta export\``);
  if (!existsSync(join(RUNTIME, 'node_modules/onnxruntime-web/dist'))) {
    throw new Error(`onnxruntime-web is not installed; run \`npm ci\` in ${RUNTIME} first`);
  }
  const table = routes(model);
  const server = createServer((req, res) => {
    const { pathname } = new URL(req.url, 'http://localhost');
    const file = locate(table, pathname);
    let ok = false;
    try {
      ok = file !== null && statSync(file).isFile();
    } catch {
      ok = false;
    }
    const headers = {
      'Cross-Origin-Opener-Policy': 'same-origin',
      'Cross-Origin-Embedder-Policy': 'require-corp',
      'Cache-Control': 'no-store',
    };
    if (!ok) {
      res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' }).end(`not found: ${pathname}\n`);
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(res);
  });
  return new Promise((done, fail) => {
    server.once('error', fail);
    server.listen(port, host, () => {
      const url = `http://${host}:${server.address().port}/`;
      done({ url, close: () => new Promise((r) => server.close(r)) });
    });
  });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const opt = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  try {
    const { url } = await startServer({ model: opt('--model'), port: Number(opt('--port') ?? 8000) });
    console.log(`serving the edgemeta example on ${url} (Ctrl-C stops it)`);
  } catch (e) {
    console.error(`error: ${e.message}`);
    process.exit(1);
  }
}
