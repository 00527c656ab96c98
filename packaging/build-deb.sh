#!/usr/bin/env bash
# Build the Debian package (cinecut-cache_<version>_all.deb) from this checkout, offline:
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: dist/)
# Needs: dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
# python3-wheel. Copies the checkout's files (tracked and untracked-but-not-ignored, so no
# .venv or build output) to a scratch tree, adds debian/ from packaging/debian and runs
# dpkg-buildpackage -us -uc -b there. Prints the path of the .deb.
set -euo pipefail

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/dist}
mkdir -p -- "$out"
out=$(cd -- "$out" && pwd)

# Debian's interpreter and tools only (a pyenv/virtualenv python3 first on PATH would build
# against the wrong interpreter).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
export DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Timestamp)}

for f in pyproject.toml README.md cinecut-cache.service packaging/debian/control; do
    [ -f "$repo/$f" ] || { echo "build-deb: $f is missing" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/cinecut-deb.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
src=$work/cinecut-cache
mkdir -p -- "$src"

if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # existing files only: a tracked file deleted in the working tree is not shipped
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$repo/$f" ] && printf '%s\0' "$f"; done |
        tar -C "$repo" --null -T - -cf - | tar -C "$src" -xf -
else
    tar -C "$repo" --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi
rm -rf -- "$src/debian"
cp -a -- "$repo/packaging/debian" "$src/debian"

(cd -- "$src" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
shopt -s nullglob
debs=("$work"/cinecut-cache_*_all.deb)
[ ${#debs[@]} -eq 1 ] || { echo "build-deb: expected one .deb, got: ${debs[*]:-none}" >&2; exit 1; }
cp -f -- "${debs[0]}" "$out/"
echo "$out/$(basename -- "${debs[0]}")"
