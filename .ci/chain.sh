#!/usr/bin/env bash
# Start a throwaway EVM chain (anvil, from npm) on a free loopback port for the x402 tests, and deploy KVUSD
# (.ci/contracts/KVUSD.sol: an OpenZeppelin ERC20 + EIP712 token with EIP-3009, 6 decimals like USDC), compiled
# here with solc-js. Writes .ci/chain.env (source it) exporting KVAGENT_TEST_CHAIN_RPC, the token's address,
# name and EIP-712 version, and KVAGENT_TEST_CHAIN_ACCOUNTS: a JSON file of funded dev keys ("facilitator"
# pays gas, "host" is the payee, "buyers" hold KVUSD, "unfunded" holds none). Prints the RPC URL.
#   .ci/chain.sh         start (npm-installs anvil, solc and OpenZeppelin into .ci/.chain if missing)
#   .ci/chain.sh stop    stop the chain started last and delete its files
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ENV_FILE="$HERE/chain.env"
NPM_DIR="$HERE/.chain"
TOKEN_NAME="KVUSD"
TOKEN_VERSION="1"
BUYERS=72               # dev accounts 2..73 get KVUSD; 74 is the unfunded buyer
MINT=1000000000         # 1,000 KVUSD (6 decimals) each

if [ "${1:-start}" = stop ]; then
  if [ -f "$ENV_FILE" ]; then
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    kill "$KVAGENT_TEST_CHAIN_PID" 2>/dev/null || true
    rm -rf "$KVAGENT_TEST_CHAIN_DIR" "$ENV_FILE"
  fi
  exit 0
fi

if [ ! -x "$NPM_DIR/node_modules/.bin/anvil" ] || [ ! -d "$NPM_DIR/node_modules/@openzeppelin/contracts" ] \
   || [ ! -d "$NPM_DIR/node_modules/solc" ]; then
  command -v npm >/dev/null || { echo "npm not found: install Node.js (>= 18) to run the chain" >&2; exit 1; }
  echo "installing anvil, solc-js and OpenZeppelin into $NPM_DIR" >&2
  mkdir -p "$NPM_DIR"
  npm install --prefix "$NPM_DIR" --no-audit --no-fund --silent \
    @foundry-rs/anvil@1.7.1 solc@0.8.37 @openzeppelin/contracts@5.7.0 >&2
fi

BASE="$(mktemp -d /tmp/kvagent-chain.XXXXXX)"
node "$HERE/contracts/compile.mjs" "$NPM_DIR/node_modules" "$BASE/KVUSD.json"

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
nohup "$NPM_DIR/node_modules/.bin/anvil" --host 127.0.0.1 --port "$PORT" --accounts $((BUYERS + 3)) \
  --config-out "$BASE/anvil.json" >"$BASE/anvil.log" 2>&1 &
PID=$!
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 150); do
  if [ -s "$BASE/anvil.json" ] && python3 -c "
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], json.dumps({'jsonrpc': '2.0', 'id': 1, 'method': 'eth_chainId',
                             'params': []}).encode(), {'Content-Type': 'application/json'})
urllib.request.urlopen(req, timeout=1)" "$URL" 2>/dev/null; then
    break
  fi
  kill -0 "$PID" 2>/dev/null || { cat "$BASE/anvil.log" >&2; exit 1; }
  sleep 0.2
done

ACCOUNTS="$BASE/accounts.json"
python3 - "$BASE/anvil.json" "$ACCOUNTS" "$BUYERS" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
keys, addrs, n = cfg["private_keys"], cfg["available_accounts"], int(sys.argv[3])
out = {"facilitator": keys[0], "host": keys[1], "buyers": keys[2:2 + n], "unfunded": keys[2 + n],
       "addresses": {"facilitator": addrs[0], "host": addrs[1], "buyers": addrs[2:2 + n], "unfunded": addrs[2 + n]}}
json.dump(out, open(sys.argv[2], "w"), indent=1)
PY
# shellcheck disable=SC2046
TOKEN="$(python3 "$HERE/contracts/deploy.py" "$URL" "$BASE/KVUSD.json" "$TOKEN_NAME" "$TOKEN_VERSION" "$MINT" \
  $(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["addresses"]["buyers"]))' "$ACCOUNTS"))"

cat >"$ENV_FILE" <<ENV
export KVAGENT_TEST_CHAIN_RPC=$URL
export KVAGENT_TEST_CHAIN_ID=31337
export KVAGENT_TEST_CHAIN_TOKEN=$TOKEN
export KVAGENT_TEST_CHAIN_TOKEN_NAME=$TOKEN_NAME
export KVAGENT_TEST_CHAIN_TOKEN_VERSION=$TOKEN_VERSION
export KVAGENT_TEST_CHAIN_ACCOUNTS=$ACCOUNTS
export KVAGENT_TEST_CHAIN_ABI=$BASE/KVUSD.json
export KVAGENT_TEST_CHAIN_PID=$PID
export KVAGENT_TEST_CHAIN_DIR=$BASE
ENV
echo "KVAGENT_TEST_CHAIN_RPC=$URL"
