// Bundles the chat page (src/main.jsx, React and the AI SDK) into dist/chat.js, which both
// examples (FastAPI and Django) serve at /static/chat.js. Run with `npm run build` after `npm ci`.
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));

await esbuild.build({
  entryPoints: [here("./src/main.jsx")],
  outfile: here("./dist/chat.js"),
  bundle: true,
  format: "esm", // loaded with <script type="module">
  jsx: "automatic", // React 17+ JSX runtime: no `import React` in every file
  minify: true,
  sourcemap: true, // chat.js.map, so the browser's devtools show the source above
  target: "es2022",
  // React picks its production build from this; left undefined it would keep dev checks in.
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "info",
});
