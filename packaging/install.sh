#!/bin/sh
# install.sh: install cinecut-cache as a systemd service without the .deb (any systemd distro).
#
#   sudo packaging/install.sh [--prefix /opt/cinecut-cache] [--prewarm [--cuda]]
#        [--source DIR|WHEEL] [--pip-args "ARGS"]
#   sudo packaging/install.sh --uninstall [--prefix ...]
#
# What it does (each step is idempotent; an existing config is never overwritten):
#   1. a venv at PREFIX/venv (--system-site-packages: a distro's python3-systemd, python3-watchdog
#      ... are reused instead of compiled), with this checkout (or a wheel) pip-installed into it;
#      --prewarm adds llama-cpp-python and friends, --cuda builds llama.cpp with CUDA (needs nvcc);
#   2. the user/group cinecut (sysusers.d) and /run/cinecut (tmpfiles.d), under /etc;
#   3. /etc/systemd/system/cinecut-cache.service: the project's unit with ExecStart pointing
#      into the venv; /usr/local/bin/cinecut{,d} links;
#   4. /etc/cinecut/cinecutd.toml from the annotated example, if absent.
# Then: edit the config, `cinecutd systemd-dropin --run-as USER --write`, `systemctl enable --now cinecut-cache`.
set -eu

PREFIX=/opt/cinecut-cache
PREWARM=0
CUDA=0
UNINSTALL=0
PIP_ARGS=
HERE=$(cd -- "$(dirname -- "$0")" && pwd)
REPO=$(cd -- "$HERE/.." && pwd)
SOURCE=$REPO

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory or wheel"; SOURCE=$2; shift ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; PIP_ARGS=$2; shift ;;
        --prewarm) PREWARM=1 ;;
        --cuda) PREWARM=1; CUDA=1 ;;
        --uninstall) UNINSTALL=1 ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed -e '/^set -eu/d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case $PREFIX in /*) ;; *) die "--prefix must be absolute" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (sudo): it creates a system user and installs a system service"
VENV=$PREFIX/venv
UNIT=/etc/systemd/system/cinecut-cache.service
have_systemd() { [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" = 1 ]; then
    if have_systemd; then systemctl disable --now cinecut-cache.service 2>/dev/null || true; fi
    rm -f -- "$UNIT" /usr/local/bin/cinecut /usr/local/bin/cinecutd
    rm -rf -- "$VENV"
    rmdir -- "$PREFIX" 2>/dev/null || true
    if have_systemd; then systemctl daemon-reload; fi
    say "removed the service and $VENV; kept /etc/cinecut, /var/lib/cinecut, the cinecut user and the work dirs"
    exit 0
fi

PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || die "$PY not found (install python3 >= 3.11)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than 3.11"
"$PY" -c 'import venv, ensurepip' 2>/dev/null ||
    die "the venv module is missing (Debian/Ubuntu: apt install python3-venv)"
command -v ffprobe >/dev/null 2>&1 || die "ffmpeg/ffprobe not found (apt install ffmpeg)"
"$PY" -c 'import systemd.journal' 2>/dev/null ||
    say "note: python3-systemd not installed system-wide; pip builds systemd-python (needs libsystemd-dev, pkg-config, a C compiler)"

# 1. the venv (code root-owned and read-only for the service)
umask 022
if [ ! -x "$VENV/bin/python3" ]; then
    say "creating $VENV"
    mkdir -p -- "$PREFIX"
    "$PY" -m venv --system-site-packages "$VENV"
fi
TARGET=$SOURCE
[ "$PREWARM" = 1 ] && TARGET="$SOURCE[prewarm]"
if [ "$CUDA" = 1 ]; then
    command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || die "--cuda needs nvcc (the CUDA toolkit)"
    export PATH="$PATH:/usr/local/cuda/bin" CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" FORCE_CMAKE=1
    say "building llama-cpp-python with CUDA; this takes several minutes"
fi
say "installing $TARGET into $VENV"
# shellcheck disable=SC2086
"$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$TARGET"
"$VENV/bin/cinecutd" --help >/dev/null || die "$VENV/bin/cinecutd does not run"

# 2. user, group and /run/cinecut
install -D -m 0644 "$HERE/sysusers.d/cinecut.conf" /etc/sysusers.d/cinecut.conf
install -D -m 0644 "$HERE/tmpfiles.d/cinecut.conf" /etc/tmpfiles.d/cinecut.conf
systemd-sysusers /etc/sysusers.d/cinecut.conf
systemd-tmpfiles --create /etc/tmpfiles.d/cinecut.conf

# 3. the unit, running the venv's cinecutd; CLI links
tmp=$(mktemp "$UNIT.XXXXXX")
sed -e "s#^ExecStart=/usr/bin/cinecutd #ExecStart=$VENV/bin/cinecutd #" "$REPO/cinecut-cache.service" >"$tmp"
grep -q "^ExecStart=$VENV/bin/cinecutd " "$tmp" || { rm -f "$tmp"; die "could not set ExecStart in the unit"; }
chmod 0644 "$tmp"
mv -f -- "$tmp" "$UNIT"
ln -sfn -- "$VENV/bin/cinecutd" /usr/local/bin/cinecutd
ln -sfn -- "$VENV/bin/cinecut" /usr/local/bin/cinecut

# 4. config
if [ ! -e /etc/cinecut/cinecutd.toml ]; then
    install -D -m 0644 "$HERE/cinecutd.toml" /etc/cinecut/cinecutd.toml
    say "wrote /etc/cinecut/cinecutd.toml: set your [[library]] paths there"
fi

if have_systemd; then
    systemctl daemon-reload
    if systemctl is-active --quiet cinecut-cache.service; then systemctl restart cinecut-cache.service; fi
fi
say "installed. Next:"
cat <<EOF
  1. edit /etc/cinecut/cinecutd.toml ([[library]] path = ...)
  2. cinecutd systemd-dropin --config /etc/cinecut/cinecutd.toml --run-as USER --write   # USER: who runs CineCut
  3. systemctl daemon-reload && systemctl enable --now cinecut-cache
  4. cinecutd status        (root, or a member of group cinecut: usermod -aG cinecut YOU)
EOF
