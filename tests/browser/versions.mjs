// Drives Debian's chromium (headless) through the dashboard's trash and versions views
// for tests/tests/dashboard.rs: restores a deleted directory from the trash and an old
// version of a file from its versions. Reports TRASH_RESTORED, VERSION_RESTORED and DONE
// on stdout; any failure exits non-zero with the reason on stderr. Environment:
// DASHBOARD_URL, OPERATOR_TOKEN, SCREENSHOT, USER_DATA_DIR, TRASH_PATH, VERSIONS_PATH,
// OLD_REV (the revision of VERSIONS_PATH to restore).

import { env, say, withDashboard } from "./session.mjs";

await withDashboard(async (page) => {
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
});
say("DONE");
