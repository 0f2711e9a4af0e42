// Drives Debian's chromium (headless) for tests/tests/dashboard.rs: the nodes table
// shows what an on-demand node said in its heartbeat: bytes here and on demand, its pin
// rules, and a progress bar for a content it is fetching. Reports RESIDENCY, PULL_BAR
// and DONE on stdout; any failure exits non-zero with the reason on stderr.
// Environment: DASHBOARD_URL, OPERATOR_TOKEN, SCREENSHOT, USER_DATA_DIR, NODE, PINNED,
// PULL_HASH.

import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
};
const STEP_TIMEOUT = 60_000;
const say = (line) => process.stdout.write(line + "\n");

const context = await chromium.launchPersistentContext(env("USER_DATA_DIR"), {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1440, height: 1100 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(env("DASHBOARD_URL"));
  await page.locator("#login.shown").waitFor();
  await page.fill("#token-input", env("OPERATOR_TOKEN"));
  await page.click("#token-save");
  await page.locator("#conn-state.live").waitFor();

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
  if (errors.length) throw new Error("errors in the page: " + errors.join("; "));
  say("DONE");
} finally {
  await context.close();
}
