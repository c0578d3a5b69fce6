#!/usr/bin/env node
// The weft command. weft ships TypeScript sources; tsx's loader lets Node run them (and
// the user's `.ts` flow files) as they are. Threads and processes that weft starts
// register the same loader themselves.
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/main.ts');
process.exitCode = await main(process.argv.slice(2));
