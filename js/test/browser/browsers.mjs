// What the browser suites share: how each browser is launched for WebRTC on loopback inside
// a network namespace (flags and prefs from ../shared/FACTS.md), and the test page.
import puppeteer from "puppeteer-core";

export const browsers = {
  chromium: {
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--allow-loopback-in-peer-connection",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
    ],
  },
  firefox: {
    browser: "firefox",
    protocol: "webDriverBiDi",
    executablePath: "/usr/bin/firefox-esr",
    headless: true,
    extraPrefsFirefox: {
      "media.peerconnection.ice.loopback": true,
      "permissions.default.microphone": 1,
    },
  },
};

/** Opens the test page (served by the interop program) and waits until it is ready. */
export async function openPage(browser, url) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.log(`# page error: ${e.message}`));
  await page.goto(`${url}/static/test/browser/page.html`);
  await page.waitForFunction(() => window.pageReady === true, { timeout: 30_000 });
  return page;
}

/** Launches one of `browsers`, with a HOME for its profile. */
export function launch(options) {
  return puppeteer.launch({ ...options, env: { ...process.env, HOME: process.env.HOME ?? "/tmp" } });
}

