// Drives Debian's chromium (headless) for tests/tests/dashboard.rs: the nodes table
// shows what an on-demand node said in its heartbeat: bytes here and on demand, its pin
// rules, and a progress bar for a content it is fetching. Reports RESIDENCY, PULL_BAR
// and DONE on stdout; any failure exits non-zero with the reason on stderr.
// Environment: DASHBOARD_URL, OPERATOR_TOKEN, SCREENSHOT, USER_DATA_DIR, NODE, PINNED,
// PULL_HASH.

import { env, say, withDashboard } from "./session.mjs";

await withDashboard(async (page) => {
  const cell = page.locator(`#nodes tr[data-node="${env("NODE")}"] td.residency`);
  await cell.locator(".od-bytes", { hasText: "on demand" }).waitFor();
  await cell.locator(".od-pins", { hasText: "pinned /" + env("PINNED") }).waitFor();
  say("RESIDENCY");
  // The content being fetched has a bar, part filled (the holder serves only its start).
  const pull = cell.locator(`.od-pull[data-hash="${env("PULL_HASH")}"]`);
  await pull.locator(".bar > div").waitFor();
  const width = await pull.locator(".bar > div").evaluate((d) => parseFloat(d.style.width));
  if (!(width > 0 && width < 100)) throw new Error("the fetch's bar is at " + width + "%");
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });
  say("PULL_BAR");
});
say("DONE");
