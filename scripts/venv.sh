# Sourced by run.sh and test.sh: make .venv hold exactly the given requirements file's pins.
# Re-installs only when that file (or what it includes) changed.
set -euo pipefail
requirements="$1"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$requirements")"
if [ ! -f "$stamp" ]; then
    # A proxy on loopback (HTTPS_PROXY=http://127.0.0.1:9 keeps WhatsApp's client offline) is not
    # a way to PyPI: pip goes without it. Any other proxy is the way out, for pip too.
    unset_loopback=()
    for variable in HTTPS_PROXY https_proxy HTTP_PROXY http_proxy; do
        case "${!variable:-}" in
            http://127.*|http://localhost*|http://\[::1\]*) unset_loopback+=(-u "$variable") ;;
        esac
    done
    env "${unset_loopback[@]}" .venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
    touch "$stamp"
fi
