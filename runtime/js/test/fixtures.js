// `npm test` runs this first: the Python runtime makes the parity fixtures once, afresh (the
// test files run in processes of their own and share them). Without a Python environment or
// the data it says why, and the tests that need them say they are skipped.
import { FIXTURES, buildFixtures, parityUnavailable } from './support.js';

const why = parityUnavailable();
if (why) {
  console.log(`parity fixtures not made: ${why}`);
} else {
  const t0 = performance.now();
  buildFixtures();
  console.log(`parity fixtures made by the Python runtime in ${FIXTURES} (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
}
