// Validate an AsyncAPI document with the official parser (@asyncapi/parser), as code generators do.
// Usage: node validate_asyncapi.mjs PATH; prints one JSON line {errors: [...], warnings: n}; exit 1 on errors.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { Parser, fromFile } from "@asyncapi/parser";

const path = resolve(process.argv[2]);
const parser = new Parser();
const { diagnostics } = await fromFile(parser, path).parse();
// severity 0 is an error in the parser's (Spectral's) scale; 1 warning, 2 info, 3 hint
const errors = diagnostics
  .filter((d) => d.severity === 0)
  .map((d) => ({ code: d.code, message: d.message, path: d.path.join(".") }));
console.log(JSON.stringify({ errors, warnings: diagnostics.filter((d) => d.severity === 1).length }));
process.exit(errors.length ? 1 : 0);
