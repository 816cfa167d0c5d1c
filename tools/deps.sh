#!/bin/sh
# Installs the Debian packages moonload needs, only those missing (nothing when all are there).
set -e
pkgs="luajit libluajit-5.1-dev lua-cjson lua-busted libopenblas-dev luarocks"
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "make deps: installing$missing"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
