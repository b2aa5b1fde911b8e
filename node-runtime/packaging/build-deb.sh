#!/usr/bin/env bash
# Builds the hyperbox Debian package: both binaries, the systemd units, the default settings
# in /etc/hyperbox (conffiles), shell completions and man pages generated from the binaries.
#
#   node-runtime/packaging/build-deb.sh [--bin-dir DIR] [--out DIR] [--revision N]
#
# Without --bin-dir it builds release binaries with cargo first (CARGO_TARGET_DIR is honoured).
# The Maintainer field comes from DEBFULLNAME and DEBEMAIL, as for other Debian tools.
# Prints the path of the .deb. Needs dpkg-dev (dpkg-shlibdeps) and binutils (strip).
#
# Built with dpkg-deb from this script rather than cargo-deb: the package needs maintainer
# scripts, generated completions and man pages and a state policy that cargo-deb would take
# as hand-written files anyway, and CI saves building a tool.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin_dir=""
out_dir="${CARGO_TARGET_DIR:-$repo/target}/deb"
revision=1
maintainer="${DEBFULLNAME:-HyperBox maintainers} <${DEBEMAIL:-maintainers@hyperbox.example.org}>"
while (($#)); do
  case "$1" in
  --bin-dir) bin_dir="$2"; shift 2 ;;
  --out) out_dir="$2"; shift 2 ;;
  --revision) revision="$2"; shift 2 ;;
  *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$bin_dir" ]]; then
  (cd "$repo" && cargo build --release --locked -p hyperbox-node -p hyperbox-operator >&2)
  bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
for b in hyperbox-node hyperbox-operator; do
  [[ -x "$bin_dir/$b" ]] || { echo "build-deb.sh: $bin_dir/$b not found (build it first)" >&2; exit 1; }
done

# "hyperbox-node 0.1.0 (commit ...)": the version the binaries report is the package's.
version="$("$bin_dir/hyperbox-node" -V | awk '{print $2}')"
arch="$(dpkg --print-architecture)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"

install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/hyperbox" \
  "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/man/man1" \
  "$root/usr/share/doc/hyperbox" "$root/DEBIAN"
for b in hyperbox-node hyperbox-operator; do
  install -m 0755 "$bin_dir/$b" "$root/usr/bin/$b"
  # Debian policy: no debug info in the package (a debug build carries hundreds of MB).
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$b"
  "$root/usr/bin/$b" completions bash >"$root/usr/share/bash-completion/completions/$b"
  "$root/usr/bin/$b" completions zsh >"$root/usr/share/zsh/vendor-completions/_$b"
  "$root/usr/bin/$b" completions fish >"$root/usr/share/fish/vendor_completions.d/$b.fish"
  "$root/usr/bin/$b" man "$work/man" >/dev/null
done
install -m 0644 "$work"/man/*.1 "$root/usr/share/man/man1/"
gzip -9n "$root"/usr/share/man/man1/*.1
install -m 0644 "$here"/systemd/hyperbox-node.service "$here"/systemd/hyperbox-operator.service \
  "$root/lib/systemd/system/"
install -m 0644 "$here/etc/node.toml" "$here/etc/operator.toml" "$root/etc/hyperbox/"
install -m 0644 "$here/debian/copyright" "$root/usr/share/doc/hyperbox/copyright"
install -D -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/hyperbox"
commit="$("$bin_dir/hyperbox-node" -V | sed -n 's/.*(commit \(.*\))$/\1/p')"
# The date of the commit when there is one, so that rebuilding a commit gives the same file.
date="$(git -C "$repo" log -1 --format=%cD 2>/dev/null || date -R)"
printf 'hyperbox (%s) unstable; urgency=medium\n\n  * Built from commit %s.\n\n -- %s  %s\n' \
  "$version-$revision" "$commit" "$maintainer" "$date" |
  gzip -9n >"$root/usr/share/doc/hyperbox/changelog.Debian.gz"
chmod 0644 "$root/usr/share/doc/hyperbox/changelog.Debian.gz"
install -m 0755 "$here/debian/postinst" "$here/debian/prerm" "$here/debian/postrm" "$root/DEBIAN/"
printf '%s\n' /etc/hyperbox/node.toml /etc/hyperbox/operator.toml >"$root/DEBIAN/conffiles"
chmod 0644 "$root/DEBIAN/conffiles" "$root"/usr/share/bash-completion/completions/* \
  "$root"/usr/share/zsh/vendor-completions/* "$root"/usr/share/fish/vendor_completions.d/*

# Library dependencies, as dpkg-shlibdeps finds them from the binaries (it wants a
# debian/control to read, even an empty one).
mkdir -p "$work/src/debian"
printf 'Source: hyperbox\n\nPackage: hyperbox\nArchitecture: any\n' >"$work/src/debian/control"
depends="$(cd "$work/src" && dpkg-shlibdeps -O -e"$root/usr/bin/hyperbox-node" \
  -e"$root/usr/bin/hyperbox-operator" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[[ -n "$depends" ]] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat >"$root/DEBIAN/control" <<CONTROL
Package: hyperbox
Version: $version-$revision
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Recommends: erofs-utils
Section: admin
Priority: optional
Description: GitOps container reconciler for edge boxes
 HyperBox runs declared container workloads from a Git repository on this
 machine: hyperbox-node supervises the containers (OCI images, EROFS,
 cgroups), and hyperbox-operator reconciles a Git repository of Workload
 manifests onto it. Both run as systemd services configured in /etc/hyperbox.
CONTROL

mkdir -p "$out_dir"
deb="$out_dir/hyperbox_${version}-${revision}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >&2
echo "$deb"
