#!/bin/sh
# prepare-source.sh TARBALL SRC PATCH... [-- STALE_DIR...]
#
# Make SRC the kernel tree of TARBALL with PATCH... applied in order, doing as little as possible:
# - SRC is extracted again only when TARBALL is another file (name, size or mtime differ); the
#   STALE_DIRs (the build directories) are then removed too, since their objects belong to the old tree.
# - When only the patches changed, the previously applied ones (copies kept in SRC/.pykvm) are
#   reversed and the new ones applied; every file either set touches is given a new mtime, so an
#   out-of-tree build recompiles exactly those files.
set -eu
tarball=$1 src=$2
shift 2
patches= stale=
while [ $# -gt 0 ]; do
  [ "$1" = -- ] && { shift; stale="$*"; break; }
  patches="$patches $1"; shift
done

state=$src/.pykvm
id="$(basename "$tarball") $(stat -c '%s %Y' "$tarball")"
if [ "$(cat "$state/source" 2>/dev/null || true)" != "$id" ]; then
  echo "  EXTRACT $tarball -> $src"
  # shellcheck disable=SC2086
  rm -rf "$src" "$src.tmp" $stale
  mkdir -p "$src.tmp"
  tar -xf "$tarball" -C "$src.tmp" --strip-components=1
  mkdir -p "$src.tmp/.pykvm/applied"
  echo "$id" > "$src.tmp/.pykvm/source"
  mv "$src.tmp" "$src"
fi

want=$(for p in $patches; do basename "$p"; cat "$p"; done | sha256sum)
have=$(for p in $(cat "$state/order" 2>/dev/null); do echo "$p"; cat "$state/applied/$p"; done | sha256sum)
[ "$want" = "$have" ] && exit 0

# Until the patches are all in, the tree is in no known state: a failure below forces a fresh extract.
rm -f "$state/source"
files() { sed -n 's,^+++ b/\([^	]*\).*,\1,p' "$@"; }
touched=$(for p in $(cat "$state/order" 2>/dev/null); do files "$state/applied/$p"; done; files $patches)
for p in $(cat "$state/order" 2>/dev/null | tac); do
  echo "  UNPATCH $p"
  patch -d "$src" -p1 -R -s --no-backup-if-mismatch < "$state/applied/$p"
done
rm -f "$state/applied/"* "$state/order"
for p in $patches; do
  echo "  PATCH   $(basename "$p")"
  patch -d "$src" -p1 -s --no-backup-if-mismatch < "$p"
  cp "$p" "$state/applied/"
  basename "$p" >> "$state/order"
done
for f in $touched; do [ -e "$src/$f" ] && touch "$src/$f"; done
echo "$id" > "$state/source"
