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
    .venv/bin/python -m pip install --disable-pip-version-check -q -r "$requirements"
    touch "$stamp"
fi
