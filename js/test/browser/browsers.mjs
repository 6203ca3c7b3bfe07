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

/**
 * Grants the microphone permission to `url`'s origin in Chromium (Firefox has it from its
 * prefs). With mDNS candidates off, Chromium gathers host candidates only for an origin
 * holding a media permission; without one it binds the any-address and signals no
 * candidate at all. That still reaches a peer that lists its own candidates (a Rust peer:
 * Chromium's checks arrive as peer-reflexive), but two such Chromium tabs have nothing to
 * try and never open a channel.
 */
export async function grantMedia(browser, url) {
  if (!(await browser.version()).toLowerCase().includes("chrom")) return;
  await browser.defaultBrowserContext().overridePermissions(new URL(url).origin, ["microphone"]);
}

/** Opens the test page (served by the interop program) and waits until it is ready. */
export async function openPage(browser, url) {
  await grantMedia(browser, url);
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

