#!/bin/sh
# Install (or upgrade) homepot-gateway as a systemd service, from this checkout.
# Run as root: `sudo make install-service` or `sudo systemd/install.sh`. Safe to run again:
# the venv and the code are brought up to date, an existing config is never overwritten (a new
# one is written from systemd/config.toml, the closed production template).
#
# Every location can be moved with an environment variable (the defaults are the contract's):
#   PYTHON=/usr/bin/python3              interpreter for the venv (the system's, not a user's pyenv)
#   PREFIX=/opt/homepot-gateway          the venv; the CLI is $PREFIX/bin/homepot-gateway
#   BINDIR=/usr/local/bin                where the CLI is linked, so `homepot-gateway` is on PATH
#   CONFDIR=/etc/homepot-gateway         config.toml (written once, absolute paths)
#   STATEDIR=/var/lib/homepot-gateway    data_dir: SQLite, broker state, passwd, keys
#   UNITDIR=/etc/systemd/system          the unit
#   DOCDIR=/usr/share/doc/homepot-gateway  README.md, where the unit's Documentation= points
#   SERVICE_USER=homepot                 system user (and group) the service runs as
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=${PREFIX:-/opt/homepot-gateway}
BINDIR=${BINDIR:-/usr/local/bin}
CONFDIR=${CONFDIR:-/etc/homepot-gateway}
STATEDIR=${STATEDIR:-/var/lib/homepot-gateway}
UNITDIR=${UNITDIR:-/etc/systemd/system}
DOCDIR=${DOCDIR:-/usr/share/doc/homepot-gateway}
SERVICE_USER=${SERVICE_USER:-homepot}
UNIT=homepot-gateway.service

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sudo make install-service)"
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/systemd/$UNIT" ] || die "not a homepot-gateway checkout: $SRC"
[ -x "$PYTHON" ] || die "PYTHON=$PYTHON not found (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PYTHON is older than Python 3.11"
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  if command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    die "$PYTHON cannot create venvs (install its venv/ensurepip package)"
  fi
fi

# 1. The system user the service runs as; it owns STATEDIR and nothing else.
if ! getent passwd "$SERVICE_USER" >/dev/null; then
  useradd --system --user-group --home-dir "$STATEDIR" --no-create-home \
          --shell /usr/sbin/nologin --comment "homepot-gateway service" "$SERVICE_USER"
  say "created system user $SERVICE_USER"
fi
GROUP=$(id -gn "$SERVICE_USER")

# 2. The venv and the code (a regular, non-editable install of this checkout).
if [ ! -x "$PREFIX/bin/python" ]; then
  # --upgrade-deps: the pip that a distribution's venv brings can be years old (Debian 12:
  # pip 23.0), and an old pip spends most of the install matching the index's files against
  # the platform (this project's first install.sh run: ~26 s of CPU with pip 23.0, ~21 s
  # with a current pip, the upgrade included).
  "$PYTHON" -m venv --upgrade-deps "$PREFIX"
fi
# What the package is built from (pyproject.toml's packages and its readme). A file the
# build needs from the checkout's top level (e.g. a LICENSE) must be added here.
PACKAGE_SOURCES="pyproject.toml README.md gateway bridges devices"
# Reinstall only when the code changed since the last run (a fingerprint of the sources).
FINGERPRINT=$(cd "$SRC" && find $PACKAGE_SOURCES docs -type f \
                ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$PREFIX/.source-sha256" 2>/dev/null)" = "$FINGERPRINT" ] && [ -x "$PREFIX/bin/homepot-gateway" ]; then
  say "code unchanged since the last install; venv kept"
else
  # Built from a copy of the package sources, not in the checkout: pip builds a local
  # directory in place, and setuptools' build/lib there keeps every module it ever copied,
  # so a module removed from the checkout would still be installed (and root would leave
  # build/ and *.egg-info behind in the user's checkout).
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  (cd "$SRC" && tar -cf - --exclude=__pycache__ --exclude='*.pyc' $PACKAGE_SOURCES) \
    | tar -xf - -C "$BUILD"
  "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$BUILD"
  rm -rf "$BUILD"
  trap - EXIT
  printf '%s\n' "$FINGERPRINT" > "$PREFIX/.source-sha256"
fi
chmod -R a+rX "$PREFIX"
install -d -m 0755 "$BINDIR"
ln -sfn "$PREFIX/bin/homepot-gateway" "$BINDIR/homepot-gateway"
VERSION=$("$PREFIX/bin/python" -c 'import gateway; print(gateway.__version__)')
say "installed homepot-gateway $VERSION in $PREFIX; CLI linked as $BINDIR/homepot-gateway"

# 3. State directory (the service's data_dir) and the config, with absolute paths.
install -d -m 0700 -o "$SERVICE_USER" -g "$GROUP" "$STATEDIR"
install -d -m 0755 "$CONFDIR"
CONFIG="$CONFDIR/config.toml"
if [ -e "$CONFIG" ]; then
  say "kept the existing $CONFIG"
else
  # A closed production template (systemd/config.toml), not the checkout's demo config.toml:
  # no anonymous clients, no simulation fleet, no rules; TLS and push shown commented.
  tmp=$(mktemp)
  sed -e "s|@STATEDIR@|$STATEDIR|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@DOCDIR@|$DOCDIR|g" \
      -e "s|@CONFIG@|$CONFIG|g" "$SRC/systemd/config.toml" > "$tmp"
  install -m 0640 -o root -g "$GROUP" "$tmp" "$CONFIG"
  rm -f "$tmp"
  say "wrote $CONFIG"
fi
"$PREFIX/bin/homepot-gateway" --config "$CONFIG" check-config >/dev/null \
  || die "$CONFIG does not validate (see the lines above)"

# 4. The README where the unit's Documentation= points, and the docs/ it links to.
install -D -m 0644 "$SRC/README.md" "$DOCDIR/README.md"
install -d -m 0755 "$DOCDIR/docs"
install -m 0644 "$SRC"/docs/*.md "$SRC"/docs/*.png "$DOCDIR/docs/"

# 5. The unit, pointed at the paths above.
tmp=$(mktemp)
sed -e "s|/opt/homepot-gateway|$PREFIX|g" \
    -e "s|/etc/homepot-gateway|$CONFDIR|g" \
    -e "s|/usr/share/doc/homepot-gateway|$DOCDIR|g" \
    -e "s|^WorkingDirectory=/var/lib/homepot-gateway|WorkingDirectory=$STATEDIR|" \
    -e "s|^User=homepot\$|User=$SERVICE_USER|" \
    -e "s|^Group=homepot\$|Group=$GROUP|" \
    "$SRC/systemd/$UNIT" > "$tmp"
if [ "$STATEDIR" != /var/lib/homepot-gateway ]; then
  # StateDirectory= names a directory under /var/lib; elsewhere the service needs write access.
  sed -i -e "s|^StateDirectory=.*|ReadWritePaths=$STATEDIR|" -e '/^StateDirectoryMode=/d' "$tmp"
fi
if [ "$CONFDIR" != /etc/homepot-gateway ]; then
  sed -i -e '/^ConfigurationDirectory/d' "$tmp"
fi
install -d -m 0755 "$UNITDIR"
install -m 0644 "$tmp" "$UNITDIR/$UNIT"
rm -f "$tmp"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$UNITDIR/$UNIT" || die "systemd-analyze verify failed on $UNITDIR/$UNIT"
fi
say "installed $UNITDIR/$UNIT"

if [ -d /run/systemd/system ] && [ "$UNITDIR" = /etc/systemd/system ]; then
  systemctl daemon-reload
  if systemctl is-active --quiet "$UNIT"; then
    systemctl restart "$UNIT"
    say "restarted the running service on the new code"
  fi
else
  say "(systemd is not running here or UNITDIR is not /etc/systemd/system: no daemon-reload)"
fi

cat <<NEXT

Next:
  1. Edit $CONFIG:
     - [[broker.listeners]]: one loopback listener, accounts only (no anonymous clients).
       For devices on the LAN uncomment the tls listener; to move the port change its bind.
     - [bridges.*]: uncomment fcm/apns/webpush with their key files (keep secrets in
       $CONFDIR, mode 0640 root:$GROUP). The simulation fleet is off.
     - [upstream] for the cloud controller, [logging] level.
     Check it: homepot-gateway --config $CONFIG check-config
  2. Accounts for devices and technicians:
       homepot-gateway users add plc-7 --role device --password-stdin
  3. Start it:   systemctl enable --now homepot-gateway
     Logs:       journalctl -u homepot-gateway -f
     After editing the password file or [logging] level: systemctl reload homepot-gateway
NEXT
