// The example page in a real browser (Debian's chromium, headless, driven by puppeteer-core;
// nothing is downloaded): enrol three Omniglot characters from image files, predict held-out
// drawings of them, check the labels the page shows, keep the store in the browser's storage
// and load it back, and refuse a damaged store file without losing the classes.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startServer } from '../../../examples/web/serve.js';
import { CHROMIUM, launch } from './chromium.js';
import { fixtures, parityUnavailable } from './support.js';

let skip = parityUnavailable();
if (!skip && !existsSync(CHROMIUM)) skip = `no browser at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`;
if (skip) console.log(`# browser test skipped: ${skip}`);

describe('the example web page in headless Chromium', { skip: skip ?? false }, () => {
  let server, browser, page, fx, pixels;
  const files = (kind, c) => readdirSync(join(fx.dir, kind, `c${c}`)).sort().map((f) => join(fx.dir, kind, `c${c}`, f));
  const idle = () => page.waitForFunction(() => document.body.dataset.busy === '0', { timeout: 60000 });

  before(async () => {
    fx = fixtures();
    server = await startServer({ model: fx.model, port: 0 });
    browser = await launch();
    page = await browser.newPage();
    await page.setViewport({ width: 900, height: 760 });
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(server.url);
    await idle();
    const status = await page.$eval('#model-info', (e) => e.textContent);
    assert.doesNotMatch(status, /Error/, `${status} ${errors.join(' ')}`);
    pixels = /takes raw pixels/.test(status);
  });

  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('shows the model it opened', async () => {
    const status = await page.$eval('#model-info', (e) => e.textContent);
    assert.match(status, /conv4 \(fp32\), 64-d sqeuclidean/);
    assert.match(status, /takes raw pixels|no pixels entry/);
  });

  test('enrols from image files and shows the right label for held-out drawings', async (t) => {
    if (!pixels) return t.skip('the model has no pixels entry: the page cannot enrol raw images with it');
    for (const c of [0, 1, 2]) {
      await page.$eval('#label', (e) => (e.value = ''));
      await page.type('#label', `character ${c}`);
      await (await page.$('#enroll-files')).uploadFile(...files('shot_files', c));
      await idle();
    }
    const classes = await page.$$eval('#classes li', (lis) => lis.map((li) => li.dataset.label));
    assert.deepEqual(classes, ['character 0', 'character 1', 'character 2']);
    const queries = [0, 1, 2].flatMap((c) => files('query_files', c).map((f) => [f, `character ${c}`]));
    const strangers = files('query_files', 3); // a character not enrolled: shown with its verdict
    await (await page.$('#predict-files')).uploadFile(...queries.map(([f]) => f), ...strangers);
    await idle();
    const shown = await page.$$eval('#predictions tbody tr', (rows) => rows.map((r) => [r.dataset.label, r.cells[2].textContent, r.dataset.unknown]));
    assert.equal(shown.length, queries.length + strangers.length);
    assert.deepEqual(shown.slice(0, queries.length).map(([label]) => label), queries.map(([, label]) => label));
    assert.ok(shown.slice(0, queries.length).every(([, , unknown]) => unknown === 'false'));
    for (const [, prob] of shown) assert.match(prob, /^\d+\.\d%$/);
    await page.screenshot({ path: process.env.EDGEMETA_JS_SCREENSHOT || join(fx.dir, 'web.png') });
  });

  test('enrols from the camera and shows live predictions', async (t) => {
    if (!pixels) return t.skip('the model has no pixels entry: camera frames are raw images');
    await page.click('#camera');
    await idle();
    await page.$eval('#label', (e) => (e.value = 'camera'));
    await page.click('#enroll-camera');
    await idle();
    assert.deepEqual(await page.$$eval('#classes li', (lis) => lis.at(-1).dataset.label), 'camera');
    await page.waitForFunction(() => document.getElementById('live-prediction').textContent.length > 0, { timeout: 30000 });
    assert.match(await page.$eval('#live-prediction', (e) => e.textContent), /^(unknown \(nearest: .+, \d+%\)|.+ \d+%)$/);
    await page.click('#camera');
    await idle();
  });

  test("saves the classes in the browser's storage and loads them back", async (t) => {
    if (!pixels) return t.skip('the model has no pixels entry: nothing could be enrolled');
    const before = await page.$$eval('#classes li', (lis) => lis.map((li) => li.textContent));
    await page.click('#save-browser');
    await idle();
    await page.evaluate(() => document.querySelector('#classes li button:last-child')?.click()); // forget the first class
    await idle();
    await page.click('#load-browser');
    await idle();
    assert.deepEqual(await page.$$eval('#classes li', (lis) => lis.map((li) => li.textContent)), before);
  });

  test('a damaged store file is refused on one line and the classes stay', async () => {
    const before = await page.$$eval('#classes li', (lis) => lis.map((li) => li.textContent));
    const bad = join(fx.dir, 'damaged.store');
    writeFileSync(bad, readFileSync(join(fx.dir, 'py.store')).subarray(0, 300));
    await (await page.$('#load-file')).uploadFile(bad);
    await idle();
    assert.match(await page.$eval('#store-status', (e) => e.textContent), /^StoreCorruptError: store damaged\.store is not a readable edgemeta store/);
    assert.deepEqual(await page.$$eval('#classes li', (lis) => lis.map((li) => li.textContent)), before);
  });

  test('with a model exported before the pixels entry, the page names the export command that adds it', async () => {
    await (await page.$('#model-file')).uploadFile(fx.older);
    await idle();
    assert.match(await page.$eval('#model-info', (e) => e.textContent), /^model-images\.onnx: .*no pixels entry/);
    await page.$eval('#label', (e) => (e.value = 'c0'));
    await (await page.$('#enroll-files')).uploadFile(...files('shot_files', 0));
    await idle();
    assert.match(await page.$eval('#status', (e) => e.textContent), /^InputError: model-images\.onnx has no 'pixels' input .*`edgemeta export CHECKPOINT -o MODEL\.onnx`/);
    assert.equal(await page.$$eval('#classes li', (lis) => lis.length), 0);
  });
});
