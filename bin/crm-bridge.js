#!/usr/bin/env node
// Runs the TypeScript CLI through tsx so the installed command needs no build step; the Docker
// image runs the compiled dist/cli.js instead.
import { register } from 'tsx/esm/api';
register();
await import('../src/cli.ts');
