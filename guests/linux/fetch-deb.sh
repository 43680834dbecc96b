#!/bin/sh
# fetch-deb.sh PACKAGE DIR: unpack Debian's PACKAGE into DIR without installing it
# (apt-get download + dpkg-deb -x; needs no root when the package lists are present).
set -eu
pkg=$1 dir=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download -q "$pkg" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get download -q "$pkg"
  else
    echo "fetch-deb: apt-get download $pkg failed; run 'apt-get update' as root, or install $pkg" >&2
    exit 1
  fi
fi
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp"
dpkg-deb -x ./*.deb "$dir.tmp"
rm -rf "$dir"
mv "$dir.tmp" "$dir"
echo "  FETCH   $pkg -> $dir"
