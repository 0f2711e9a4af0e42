// Drives Debian's chromium (headless) through the manager's dashboard for
// tests/tests/dashboard.rs. It reports each step on stdout as one line the Rust test
// waits for (READY, CHANGE_SEEN, SYNC_CLICKED, STALL_WATCH, STALL_SHOWN, DONE); any failure exits non-zero with
// the reason on stderr. Environment: DASHBOARD_URL, OPERATOR_TOKEN, SCREENSHOT,
// USER_DATA_DIR, CHANGED_PATH (the path the test changes once READY is printed).

import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
};
const url = env("DASHBOARD_URL");
const token = env("OPERATOR_TOKEN");
const screenshot = env("SCREENSHOT");
const userDataDir = env("USER_DATA_DIR");
const changedPath = env("CHANGED_PATH");
// Generous for a loaded 2-core CI machine; every wait is on a condition, never a pause.
const STEP_TIMEOUT = 60_000;

const say = (line) => process.stdout.write(line + "\n");

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1440, height: 900 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(STEP_TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  let loads = 0;
  page.on("load", () => loads++);

  await page.goto(url);
  // A fresh profile has no token: the page asks for one, and refuses a wrong one.
  await page.locator("#login.shown").waitFor();
  await page.fill("#token-input", "0".repeat(64));
  await page.click("#token-save");
  await page.locator("#login-error", { hasText: "refused" }).waitFor();
  await page.fill("#token-input", token);
  await page.click("#token-save");
  await page.locator("#login.shown").waitFor({ state: "hidden" });
  await page.locator("#conn-state.live").waitFor();
  await page.locator('#nodes tr[data-node="n1"] .badge.online').waitFor();
  // Marks this document: a reload would lose it.
  await page.evaluate(() => { window.__sameDocument = true; });
  say("READY");

  // The test now writes CHANGED_PATH in n1's mount; it must show up without a reload.
  await page.locator(`#changes li[data-path="${changedPath}"]`).waitFor();
  const same = await page.evaluate(() => window.__sameDocument === true);
  if (!same || loads !== 1) throw new Error(`the page was reloaded (loads: ${loads})`);
  say("CHANGE_SEEN");

  await page.click('#nodes tr[data-node="n1"] .sync-btn');
  await page.locator("#toast", { hasText: "Sync requested on n1" }).waitFor();
  say("SYNC_CLICKED");

  // Let a transfer (simulated by the test) show with its bar before the screenshot.
  await page.locator(".transfer .bar").first().waitFor();
  await page.screenshot({ path: screenshot, fullPage: true });

  // The test now makes the manager stuck (it locks its database): the page must say so
  // (the manager calls itself stuck after 30 s; the page asks every 5 s), and stop
  // saying so once the test releases the lock.
  if (await page.locator("#stall-banner.shown").count() !== 0) throw new Error("a stall banner before any stall");
  say("STALL_WATCH");
  await page.locator("#stall-banner.shown", { hasText: "The manager is stuck" }).waitFor({ timeout: 120_000 });
  say("STALL_SHOWN");
  await page.locator("#stall-banner.shown").waitFor({ state: "hidden", timeout: 120_000 });
  if (errors.length) throw new Error("errors in the page: " + errors.join("; "));
  say("DONE");
} finally {
  await context.close();
}
