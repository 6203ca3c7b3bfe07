// The single-file browser bundle (socket.io-client included) and the budget bundle (without it).
import { build } from "esbuild";

const common = { bundle: true, format: "esm", platform: "browser", target: "es2022", minify: true, logLevel: "warning" };
await build({ ...common, entryPoints: ["src/browser.ts"], outfile: "dist/socketio-p2p.browser.js" });
await build({
  ...common,
  entryPoints: ["src/index.ts"],
  outfile: "dist/budget/socketio-p2p.min.js",
  external: ["socket.io-client"],
});
