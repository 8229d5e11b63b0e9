#!/usr/bin/env bash
# Make sure the browser test has what it needs: Debian's chromium (driven by the playwright package,
# which never downloads a browser of its own here) and a CJK font for lesson 02's token figure.
# Called by .ci/run; safe to run again (it installs only what is missing). Needs root (apt-get).
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || missing+=(fonts-noto-cjk)

if [ ${#missing[@]} -gt 0 ]; then
    echo "ensure_chromium: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    # matplotlib caches its font list: drop it so that the CJK font is seen
    rm -f "${HOME:-/root}"/.cache/matplotlib/fontlist-*.json
fi
/usr/bin/chromium --version
