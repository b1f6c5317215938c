import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // Tests share one server; running files in parallel would not speed anything up.
    fileParallelism: false,
  },
})
