// The package as bundlers see it: the size budget, and a Vite app with no config.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, writeFileSync, readFileSync, readdirSync, symlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { build as esbuild } from "esbuild";

const jsRoot = path.resolve(import.meta.dirname, "..");

test("budget: at most 30 kB min+gzip without socket.io-client", async () => {
  const out = await esbuild({
    entryPoints: [path.join(jsRoot, "src/index.ts")],
    bundle: true,
    minify: true,
    format: "esm",
    platform: "browser",
    external: ["socket.io-client"],
    write: false,
  });
  const gz = gzipSync(out.outputFiles[0].contents).length;
  console.log(`# bundle: ${out.outputFiles[0].contents.length} bytes min, ${gz} bytes min+gzip`);
  assert.ok(gz <= 30_000, `${gz} bytes`);
});

test("package.json: ESM only, no side effects, one dependency", () => {
  const pkg = JSON.parse(readFileSync(path.join(jsRoot, "package.json"), "utf8"));
  assert.equal(pkg.type, "module");
  assert.equal(pkg.sideEffects, false);
  assert.deepEqual(Object.keys(pkg.dependencies), ["socket.io-client"]);
  assert.match(pkg.dependencies["socket.io-client"], /^\^4\./);
});

test("the browser bundle is one file with no Node built-ins", () => {
  const text = readFileSync(path.join(jsRoot, "dist/socketio-p2p.browser.js"), "utf8");
  assert.doesNotMatch(text, /from ?["']node:|require\(/);
  assert.match(text, /export\{/);
});

test("a tiny Vite app importing the package builds with no config", async () => {
  const dir = mkdtempSync(path.join(tmpdir(), "p2p-vite-"));
  try {
    mkdirSync(path.join(dir, "node_modules"));
    symlinkSync(jsRoot, path.join(dir, "node_modules/socketio-p2p"), "dir");
    writeFileSync(path.join(dir, "index.html"), '<!doctype html><script type="module" src="/main.js"></script>\n');
    writeFileSync(
      path.join(dir, "main.js"),
      'import { io } from "socket.io-client";\nimport { P2P } from "socketio-p2p";\n' +
        'const p2p = new P2P(io(location.origin), { rooms: ["chat"] });\n' +
        'p2p.on("msg", (text, { from }) => console.log(from, text));\n',
    );
    // socket.io-client resolves from the app too, as in a real app's node_modules.
    symlinkSync(path.join(jsRoot, "node_modules/socket.io-client"), path.join(dir, "node_modules/socket.io-client"), "dir");
    const { build } = await import("vite");
    await build({ root: dir, configFile: false, logLevel: "silent" });
    const assets = readdirSync(path.join(dir, "dist/assets")).filter((f) => f.endsWith(".js"));
    assert.equal(assets.length, 1);
    const js = readFileSync(path.join(dir, "dist/assets", assets[0]), "utf8");
    assert.match(js, /p2p:req/);
    assert.doesNotMatch(js, /from ?["']node:/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
