// The example page: the JavaScript runtime (/edgemeta/web.js) on onnxruntime-web. Enrol
// classes from image files or the camera, predict, and keep the store (a download, or the
// browser's localStorage). Images go to the model as decoded RGBA (ImageData): the model's
// `pixels` entry does colour, resizing and normalization.
import { create, ort } from '/edgemeta/web.js';

ort.env.wasm.wasmPaths = new URL('/ort/', location.href).href; // absolute: the .wasm files are served from there
// threads need a cross-origin isolated page (serve.js sends the headers); otherwise one thread.
// ?threads=N sets the number (1 is steadier on a busy machine: threads wait for each other)
const asked = Number(new URLSearchParams(location.search).get('threads'));
ort.env.wasm.numThreads = !self.crossOriginIsolated ? 1 : asked >= 1 ? asked : Math.min(4, navigator.hardwareConcurrency || 1);

const $ = (id) => document.getElementById(id);
let clf = null;
let stream = null;

function busy(on) {
  document.body.dataset.busy = on ? '1' : '0';
}

function say(id, text, error = false) {
  $(id).textContent = text;
  $(id).classList.toggle('error', error);
}

/** Run an action; its error (bad image, wrong store, ...) is shown as one line. */
async function guarded(action, where = 'status') {
  busy(true);
  try {
    await action();
  } catch (e) {
    say(where, `${e.name}: ${e.message}`, true);
    console.error(e);
  } finally {
    busy(false);
  }
}

/** A file or a video frame -> ImageData (RGBA bytes as decoded, without colour management). */
async function pixels(source) {
  const bitmap = source instanceof Blob ? await createImageBitmap(source, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' }) : source;
  const w = bitmap.width || bitmap.videoWidth;
  const h = bitmap.height || bitmap.videoHeight;
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, w, h);
}

function showModel() {
  const m = clf.metadata;
  const t = clf.threshold === null ? 'none' : clf.threshold.toFixed(3);
  say('model-info', `${clf.source}: ${m.backbone} (${m.precision}), ${m.embeddingDim}-d ${m.metric}, ` +
    `${clf.hasPixels ? 'takes raw pixels' : 'no pixels entry'}, unknown over distance ${t}; ` +
    `ONNX Runtime ${ort.env.versions?.web ?? ''} on ${clf.executionProviders.join(', ')}, ${ort.env.wasm.numThreads} thread(s)`);
  $('enroll-camera').disabled = !stream;
}

function showClasses() {
  const ul = $('classes');
  ul.replaceChildren();
  for (const [label, count] of Object.entries(clf.counts)) {
    const li = document.createElement('li');
    li.dataset.label = label;
    li.append(`${label} (${count} shot${count === 1 ? '' : 's'})`);
    const rename = document.createElement('button');
    rename.textContent = 'rename';
    rename.onclick = () => {
      const name = prompt(`new name for ${label}`, label);
      if (name) guarded(async () => { clf.rename(label, name); showClasses(); });
    };
    const forget = document.createElement('button');
    forget.textContent = 'forget';
    forget.onclick = () => guarded(async () => { clf.forget(label); showClasses(); });
    li.append(rename, forget);
    ul.append(li);
  }
}

async function openModel(source) {
  clf = await create(source, { executionProviders: ['wasm'] });
  showModel();
  showClasses();
}

function label() {
  const name = $('label').value.trim();
  if (!name) throw new Error('name the class first');
  return name;
}

$('enroll-files').onchange = (ev) => guarded(async () => {
  const files = [...ev.target.files];
  ev.target.value = '';
  const name = label();
  const images = await Promise.all(files.map(pixels));
  await clf.enroll(name, images);
  showClasses();
  say('status', `enrolled ${files.length} image(s) as ${name}`);
});

$('predict-files').onchange = (ev) => guarded(async () => {
  const files = [...ev.target.files];
  ev.target.value = '';
  const preds = await clf.predict(await Promise.all(files.map(pixels)), { topK: 3 });
  const body = $('predictions').tBodies[0];
  body.replaceChildren();
  preds.forEach((p, i) => {
    const tr = body.insertRow();
    tr.dataset.file = files[i].name;
    tr.dataset.label = p.label;
    tr.dataset.unknown = String(p.unknown);
    const img = document.createElement('img');
    img.src = URL.createObjectURL(files[i]);
    img.title = files[i].name;
    tr.insertCell().append(img);
    tr.insertCell().textContent = p.label;
    tr.insertCell().textContent = `${(100 * p.probability).toFixed(1)}%`;
    tr.insertCell().textContent = p.distance.toFixed(3);
    const verdict = tr.insertCell();
    verdict.textContent = p.unknown ? 'unknown' : '';
    verdict.className = p.unknown ? 'unknown' : '';
  });
});

async function liveLoop() {
  const video = $('video');
  while (stream) {
    if (clf.labels.length && video.videoWidth) {
      const [p] = await clf.predict(await pixels(video));
      $('live-prediction').textContent = p.unknown ? `unknown (nearest: ${p.label}, ${(100 * p.probability).toFixed(0)}%)` : `${p.label} ${(100 * p.probability).toFixed(0)}%`;
    }
    await new Promise((r) => requestAnimationFrame(r));
  }
}

$('camera').onclick = () => guarded(async () => {
  if (stream) {
    stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $('live').hidden = true;
    $('camera').textContent = 'start the camera';
  } else {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    $('video').srcObject = stream;
    await $('video').play();
    $('live').hidden = false;
    $('camera').textContent = 'stop the camera';
    liveLoop().catch((e) => say('status', `${e.name}: ${e.message}`, true));
  }
  showModel();
});

$('enroll-camera').onclick = () => guarded(async () => {
  const name = label();
  const frames = [];
  for (let i = 0; i < 5; i++) {
    frames.push(await pixels($('video')));
    await new Promise((r) => setTimeout(r, 200)); // a little movement between shots
  }
  await clf.enroll(name, frames);
  showClasses();
  say('status', `enrolled 5 camera frames as ${name}`);
});

const storageKey = () => `edgemeta.store.${clf.fingerprint}`;

$('save-download').onclick = () => guarded(async () => {
  const bytes = await clf.saveBytes();
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([bytes], { type: 'application/octet-stream' }));
  a.download = 'classes.store';
  a.click();
  say('store-status', `downloaded ${clf.labels.length} class(es), ${bytes.length} bytes`);
}, 'store-status');

$('save-browser').onclick = () => guarded(async () => {
  const bytes = await clf.saveBytes();
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  localStorage.setItem(storageKey(), btoa(text));
  say('store-status', `saved ${clf.labels.length} class(es) in this browser`);
}, 'store-status');

$('load-file').onchange = (ev) => guarded(async () => {
  const file = ev.target.files[0];
  ev.target.value = '';
  await clf.loadBytes(new Uint8Array(await file.arrayBuffer()), { source: file.name });
  showClasses();
  say('store-status', `loaded ${clf.labels.length} class(es) from ${file.name}`);
}, 'store-status');

$('load-browser').onclick = () => guarded(async () => {
  const text = localStorage.getItem(storageKey());
  if (text === null) throw new Error('nothing saved in this browser for this model yet; save first');
  await clf.loadBytes(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)), { source: 'this browser' });
  showClasses();
  say('store-status', `loaded ${clf.labels.length} class(es) from this browser`);
}, 'store-status');

$('model-file').onchange = (ev) => guarded(() => openModel(ev.target.files[0]));

guarded(async () => {
  const head = await fetch('model.onnx', { method: 'HEAD' });
  if (head.ok) await openModel(new URL('model.onnx', location.href).href);
  else say('model-info', 'no model served; pick an exported .onnx file (node examples/web/serve.js --model MODEL.onnx serves one)');
});
