#!/usr/bin/env bash
# Renders every Mermaid golden of `kproxy explain -o mermaid` (testdata/trace/golden/*.mmd)
# and the README's diagram with @mermaid-js/mermaid-cli and a headless Chromium: a diagram
# that does not parse fails the script. Needs network access to npm and Debian once:
#   apt-get install chromium; npm install --prefix "$DIR" @mermaid-js/mermaid-cli
# (PUPPETEER_SKIP_DOWNLOAD=1: the Debian Chromium is used).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${MERMAID_DIR:-/tmp/kproxy-mermaid}
mmdc="$DIR/node_modules/.bin/mmdc"
if [ ! -x "$mmdc" ]; then
  mkdir -p "$DIR"
  PUPPETEER_SKIP_DOWNLOAD=1 npm install --silent --prefix "$DIR" @mermaid-js/mermaid-cli
fi
cfg="$DIR/puppeteer.json"
echo '{"executablePath":"/usr/bin/chromium","args":["--no-sandbox","--disable-gpu"]}' >"$cfg"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
python3 - "$out/readme.mmd" <<'PY'
import re, sys
s = open("README.md").read()
blocks = re.findall(r"```mermaid\n(.*?)```", s, re.S)
assert blocks, "no mermaid block in README.md"
open(sys.argv[1], "w").write(blocks[0])
PY
for f in testdata/trace/golden/*.mmd "$out/readme.mmd"; do
  "$mmdc" -q -p "$cfg" -i "$f" -o "$out/$(basename "$f").svg"
  echo "ok $f"
done
