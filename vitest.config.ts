import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Executors start threads and processes: keep files in separate forks, two at a time (2 cores).
    pool: 'forks',
    maxWorkers: 2,
    reporters: ['default'],
  },
});
