#!/usr/bin/env bash
# Look at the built manual in a real browser with the network off: headless Chromium (Debian's
# `apt-get install chromium`) screenshots pages served from 127.0.0.1, every other host unreachable,
# so an equation or a style that needed a CDN would show as raw text.
#   bash scripts/docs_screenshots.sh [OUT_DIR]     # default /tmp/dpo_ds_shots; PNGs of the pages below
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/dpo_ds_shots}
PAGES=${PAGES:-"index training/losses reference/config getting-started"}
command -v chromium >/dev/null || { echo "needs chromium: apt-get install chromium" >&2; exit 2; }
[ -d .venv ] && . .venv/bin/activate
mkdir -p "$OUT"
SITE=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$SITE"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m http.server "$port" --bind 127.0.0.1 --directory "$SITE" >/dev/null 2>&1 &
server=$!
trap 'kill $server; rm -rf "$SITE"' EXIT
sleep 1
for page in $PAGES; do
    url="http://127.0.0.1:$port/${page%index}"
    [ "$page" = index ] || url="$url/"
    png="$OUT/$(echo "$page" | tr / _).png"
    # every host but 127.0.0.1 resolves to nothing: the network is off for the page
    chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1600 \
        --host-resolver-rules="MAP * ~NOTFOUND, EXCLUDE 127.0.0.1" --virtual-time-budget=5000 \
        --screenshot="$png" "$url" 2>/dev/null
    echo "$url -> $png"
done
