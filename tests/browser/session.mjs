// What the dashboard scripts share: their environment, their step lines on stdout, and
// a headless chromium logged in to the dashboard with the operator token.

import { chromium } from "playwright-core";

export const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
};
// Generous for a loaded 2-core CI machine; every wait is on a condition, never a pause.
export const STEP_TIMEOUT = 60_000;
export const say = (line) => process.stdout.write(line + "\n");

// Runs `steps(page)` on the dashboard (DASHBOARD_URL, OPERATOR_TOKEN, USER_DATA_DIR),
// logged in and live; fails if the page threw errors meanwhile; closes the browser.
export async function withDashboard(steps) {
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
    await steps(page);
    if (errors.length) throw new Error("errors in the page: " + errors.join("; "));
  } finally {
    await context.close();
  }
}
