// Drives Debian's chromium (headless) through the dashboard's trash and versions views
// for tests/tests/dashboard.rs: restores a deleted directory from the trash and an old
// version of a file from its versions. Reports TRASH_RESTORED, VERSION_RESTORED and DONE
// on stdout; any failure exits non-zero with the reason on stderr. Environment:
// DASHBOARD_URL, OPERATOR_TOKEN, SCREENSHOT, USER_DATA_DIR, TRASH_PATH, VERSIONS_PATH,
// OLD_REV (the revision of VERSIONS_PATH to restore).

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

  // The trash lists the deleted directory with what is below it; Restore brings it back.
  const row = page.locator(`#trash tr[data-path="${env("TRASH_PATH")}"]`);
  await row.waitFor();
  await row.locator("td", { hasText: "directory with" }).waitFor();
  await row.locator(".restore-btn").click();
  await page.locator("#toast", { hasText: "Restored" }).waitFor();
  await row.waitFor({ state: "detached" });
  say("TRASH_RESTORED");

  // The versions view lists the file's versions; the old one is restored.
  await page.fill("#versions-path", env("VERSIONS_PATH"));
  await page.click('#versions-form button[type="submit"]');
  const old = page.locator(`#versions tr[data-rev="${env("OLD_REV")}"]`);
  await old.locator(".state", { hasText: "available" }).waitFor();
  await page.locator("#versions tr .state", { hasText: "current" }).waitFor();
  await page.screenshot({ path: env("SCREENSHOT"), fullPage: true });
  await old.locator(".restore-btn").click();
  await page.locator("#toast", { hasText: "Restored 1 path(s)" }).waitFor();
  say("VERSION_RESTORED");
  // The node's kept bytes show in the nodes table.
  await page.locator('#nodes tr[data-node="n2"] td.kept', { hasText: "B" }).waitFor();
  if (errors.length) throw new Error("errors in the page: " + errors.join("; "));
  say("DONE");
} finally {
  await context.close();
}
