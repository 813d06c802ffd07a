// The system Chromium (Debian's package; never a downloaded browser), headless, for the
// browser test and the benchmark.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--no-first-run',
  // a synthetic camera, granted without a prompt, for the page's camera path
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
];

/** Launch the system Chromium with a fresh profile. */
export async function launch() {
  const { default: puppeteer } = await import('puppeteer-core');
  return puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    userDataDir: mkdtempSync(join(tmpdir(), 'edgemeta-chromium-')),
  });
}
