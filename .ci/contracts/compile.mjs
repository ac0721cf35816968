// Compile .ci/contracts/KVUSD.sol with solc-js (OpenZeppelin from node_modules) into one JSON file:
// {abi, bytecode, methods}. Usage: node compile.mjs NODE_MODULES_DIR OUT_JSON
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const [nodeModules, out] = process.argv.slice(2);
const require = createRequire(path.join(nodeModules, "noop.js"));
const solc = require("solc");
const here = path.dirname(new URL(import.meta.url).pathname);
const input = {
  language: "Solidity",
  sources: { "KVUSD.sol": { content: fs.readFileSync(path.join(here, "KVUSD.sol"), "utf8") } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: "cancun",
    outputSelection: { "KVUSD.sol": { KVUSD: ["abi", "evm.bytecode.object", "evm.methodIdentifiers"] } },
  },
};
const findImports = (p) => {
  try {
    return { contents: fs.readFileSync(path.join(nodeModules, p), "utf8") };
  } catch (e) {
    return { error: `not found: ${p}` };
  }
};
const result = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (result.errors || []).filter((e) => e.severity === "error");
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const c = result.contracts["KVUSD.sol"].KVUSD;
fs.writeFileSync(out, JSON.stringify({ abi: c.abi, bytecode: "0x" + c.evm.bytecode.object,
  methods: c.evm.methodIdentifiers, solc: solc.version() }));
