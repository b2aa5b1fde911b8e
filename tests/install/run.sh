#!/usr/bin/env bash
# Edge install test (issue 11): the version and build info of both binaries, the commit
# fallback of build.rs, the Debian package (files and modes, completions, man pages), the
# config files (mode, parsed by the installed binaries), the systemd units (systemd-analyze
# verify, and their ExecStart lines run as written, since systemd is not PID 1 here),
# `hyperbox-operator init`, dpkg -r / -P, and the conversion of an older package's .env files.
#
#   tests/install/run.sh          (as root; HYPERBOX_BIN_DIR=DIR to test prebuilt binaries)
#
# Installs what it needs with apt-get. It installs the hyperbox package and removes it again;
# it refuses to run where hyperbox is already installed or /etc/hyperbox exists, and it never
# deletes a state dir that existed before it ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

step() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }

packages=(dpkg-dev binutils systemd man-db python3 git)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if dpkg-query -W -f='${Status}' hyperbox 2>/dev/null | grep -qv "not-installed"; then
  fail "the hyperbox package is installed here; this test installs and purges it: remove it first"
fi
[[ ! -e /etc/hyperbox ]] || fail "/etc/hyperbox exists; this test would purge it: move it away first"
preexisting_state=()
for d in /var/lib/hyperbox /var/lib/hyperbox-operator; do
  [[ ! -e "$d" ]] || preexisting_state+=("$d")
done

target="${CARGO_TARGET_DIR:-$repo/target}"
if [[ -n "${HYPERBOX_BIN_DIR:-}" ]]; then
  bin_dir="$HYPERBOX_BIN_DIR"
else
  cargo build -q -p hyperbox-node -p hyperbox-operator
  bin_dir="$target/debug"
fi

work="$(mktemp -d)"
cgroup_parent="/hyperbox-install-test-$$"
installed=0
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((installed)); then
    dpkg -P hyperbox >/dev/null 2>&1 || true
    # Only what this run created.
    if ((${#preexisting_state[@]} == 0)); then
      rm -rf --one-file-system /var/lib/hyperbox /var/lib/hyperbox-operator
    fi
  fi
  rm -f /etc/systemd/system/multi-user.target.wants/hyperbox-{node,operator}.service
  for d in /sys/fs/cgroup/*"$cgroup_parent" /sys/fs/cgroup/"$cgroup_parent"; do
    [[ -d "$d" ]] && rmdir "$d" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Waits up to $1 seconds for the command that follows to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

step "version: --version, version, -V"
if [[ -n "${HYPERBOX_GIT_COMMIT:-}" ]]; then
  commit="$HYPERBOX_GIT_COMMIT"
else
  commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
fi
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
for b in hyperbox-node hyperbox-operator; do
  long="$("$bin_dir/$b" --version)"
  [[ "$("$bin_dir/$b" version)" == "$long" ]] || fail "$b: version and --version differ"
  [[ "$(sed -n 1p <<<"$long")" == "$b $version" ]] || fail "$b --version: first line: $long"
  [[ "$(sed -n 2p <<<"$long")" == "commit: $commit" ]] || fail "$b --version: commit (want $commit): $long"
  grep -qx "features:" <<<"$long" || fail "$b --version: no features: $long"
  grep -q "^  ebpf: " <<<"$long" || fail "$b --version: ebpf: $long"
  grep -q "^  erofs: " <<<"$long" || fail "$b --version: erofs: $long"
  [[ "$("$bin_dir/$b" -V)" == "$b $version (commit $commit)" ]] || fail "$b -V: $("$bin_dir/$b" -V)"
done
# The installed node was built with its eBPF programs (install-deps.sh installs clang, bpftool).
"$bin_dir/hyperbox-node" --version | grep -q '^  ebpf: built' ||
  fail "hyperbox-node --version: ebpf not built: $("$bin_dir/hyperbox-node" --version)"
"$bin_dir/hyperbox-operator" --version | grep -qx '  ebpf: not built' ||
  fail "hyperbox-operator --version: ebpf"
"$bin_dir/hyperbox-node" --version | grep -Eq '^  erofs: (available|unavailable) \(detected at run time' ||
  fail "hyperbox-node --version: erofs is not detected at run time"
echo "ok: both binaries report version $version, commit $commit and features" >&2

step "build.rs: the commit outside a Git checkout, and set by a packager"
rustc --edition 2021 -O -o "$work/build-script" node-runtime/client/build.rs
mkdir "$work/no-git"
out="$(cd "$work/no-git" && CARGO_MANIFEST_DIR="$work/no-git" GIT_CEILING_DIRECTORIES="$work" \
  "$work/build-script")"
grep -qx "cargo:rustc-env=HYPERBOX_GIT_COMMIT=unknown" <<<"$out" || fail "no checkout: $out"
out="$(CARGO_MANIFEST_DIR="$work/no-git" HYPERBOX_GIT_COMMIT=0123abcd "$work/build-script")"
grep -qx "cargo:rustc-env=HYPERBOX_GIT_COMMIT=0123abcd" <<<"$out" || fail "packager's commit: $out"
out="$(env -u HYPERBOX_GIT_COMMIT CARGO_MANIFEST_DIR="$repo/node-runtime/client" "$work/build-script")"
if git rev-parse -q HEAD >/dev/null 2>&1; then
  grep -qx "cargo:rustc-env=HYPERBOX_GIT_COMMIT=$(git rev-parse --short=12 HEAD)" <<<"$out" ||
    fail "checkout: $out"
  # A commit reruns the build script: it watches HEAD and the branch's ref.
  grep -q "^cargo:rerun-if-changed=.*HEAD$" <<<"$out" || fail "build.rs does not watch HEAD: $out"
fi
echo "ok: unknown outside a checkout, the packager's value when set, HEAD in a checkout" >&2

step "build the package"
deb="$(node-runtime/packaging/build-deb.sh --bin-dir "$bin_dir" --out "$work/deb")"
[[ -f "$deb" ]] || fail "no package built"
dpkg-deb -I "$deb" >&2

step "dpkg -i"
installed=1
dpkg -i "$deb" >/dev/null
# path mode owner: every file the package owns, and the dirs it creates.
expected="$work/expected"
{
  echo "/usr/bin/hyperbox-node 755 root:root"
  echo "/usr/bin/hyperbox-operator 755 root:root"
  echo "/lib/systemd/system/hyperbox-node.service 644 root:root"
  echo "/lib/systemd/system/hyperbox-operator.service 644 root:root"
  echo "/etc/hyperbox 755 root:root"
  echo "/etc/hyperbox/node.toml 644 root:root"
  echo "/etc/hyperbox/operator.toml 644 root:root"
  echo "/usr/share/doc/hyperbox/copyright 644 root:root"
  echo "/usr/share/doc/hyperbox/changelog.Debian.gz 644 root:root"
  echo "/usr/share/lintian/overrides/hyperbox 644 root:root"
  for b in hyperbox-node hyperbox-operator; do
    echo "/usr/share/bash-completion/completions/$b 644 root:root"
    echo "/usr/share/zsh/vendor-completions/_$b 644 root:root"
    echo "/usr/share/fish/vendor_completions.d/$b.fish 644 root:root"
    echo "/usr/share/man/man1/$b.1.gz 644 root:root"
    echo "/usr/share/man/man1/$b-version.1.gz 644 root:root"
  done
  echo "/usr/share/man/man1/hyperbox-node-serve.1.gz 644 root:root"
  echo "/usr/share/man/man1/hyperbox-operator-git.1.gz 644 root:root"
} >"$expected"
if ((${#preexisting_state[@]} == 0)); then
  printf '%s\n' "/var/lib/hyperbox 700 root:root" "/var/lib/hyperbox-operator 700 root:root" >>"$expected"
fi
while read -r path mode owner; do
  [[ -e "$path" ]] || fail "$path is not installed"
  got="$(stat -c '%a %U:%G' "$path")"
  [[ "$got" == "$mode $owner" ]] || fail "$path: mode/owner $got, want $mode $owner"
done <"$expected"
echo "ok: $(wc -l <"$expected") paths in place with the right modes" >&2
conffiles="$(dpkg-query -W -f='${Conffiles}\n' hyperbox | awk 'NF {print $1}' | sort | tr '\n' ' ')"
[[ "$conffiles" == "/etc/hyperbox/node.toml /etc/hyperbox/operator.toml " ]] || fail "conffiles: $conffiles"
# Nothing outside these places.
unexpected="$(dpkg -L hyperbox | grep -Ev '^/(\.|etc|etc/hyperbox(/.*)?|lib|lib/systemd(/system(/hyperbox-(node|operator)\.service)?)?|usr|usr/bin(/hyperbox-(node|operator))?|usr/share|usr/share/(doc|man|man/man1|bash-completion|bash-completion/completions|zsh|zsh/vendor-completions|fish|fish/vendor_completions\.d)|usr/share/doc/hyperbox(/copyright|/changelog\.Debian\.gz)?|usr/share/lintian(/overrides(/hyperbox)?)?|usr/share/man/man1/hyperbox-[a-z-]+\.1\.gz|usr/share/bash-completion/completions/hyperbox-(node|operator)|usr/share/zsh/vendor-completions/_hyperbox-(node|operator)|usr/share/fish/vendor_completions\.d/hyperbox-(node|operator)\.fish)$' || true)"
[[ -z "$unexpected" ]] || fail "unexpected files in the package: $unexpected"
for b in hyperbox-node hyperbox-operator; do
  [[ "$(/usr/bin/$b -V)" == "$b $version (commit $commit)" ]] || fail "installed $b -V"
done

step "completions and man pages"
for b in hyperbox-node hyperbox-operator; do
  f="/usr/share/bash-completion/completions/$b"
  bash -n "$f" || fail "$f: bash syntax"
  grep -q "complete .*$b" "$f" || fail "$f: no complete command for $b"
  # Sourced, it completes the subcommands (clap_complete names the function _hyperbox__node).
  fn="_${b//-/__}"
  words="$(bash -c 'source "$1"; COMP_WORDS=("$2" ""); COMP_CWORD=1; "$3" "$2" "" "$2"
    printf "%s\n" "${COMPREPLY[@]}"' _ "$f" "$b" "$fn")"
  grep -qx version <<<"$words" || fail "$f: completing '$b ' does not offer version: $words"
  grep -q "^#compdef $b" "/usr/share/zsh/vendor-completions/_$b" || fail "zsh completion of $b"
  grep -q "complete -c $b" "/usr/share/fish/vendor_completions.d/$b.fish" || fail "fish completion of $b"
done
for page in /usr/share/man/man1/hyperbox-*.1.gz; do
  name="$(basename "$page" .1.gz)"
  zcat "$page" | grep -q "^\.TH $name 1" || fail "$page: no .TH header for $name"
  rendered="$(MANWIDTH=80 man -l "$page" 2>"$work/man.err")" || fail "$page: man -l: $(cat "$work/man.err")"
  grep -q "^NAME" <<<"$rendered" || fail "$page: rendered without a NAME section"
  [[ "$(man -w "$name")" == "$page" ]] || fail "man -w $name: $(man -w "$name" 2>&1)"
done
echo "ok: bash -n and a completion of the subcommands; zsh and fish scripts; $(ls /usr/share/man/man1/hyperbox-*.1.gz | wc -l) man pages render" >&2

step "systemd-analyze verify"
out="$(systemd-analyze verify /lib/systemd/system/hyperbox-node.service \
  /lib/systemd/system/hyperbox-operator.service 2>&1)" || fail "systemd-analyze verify: $out"
[[ -z "$out" ]] || fail "systemd-analyze verify warns: $out"
echo "ok: both units verify without a warning" >&2

step "the config files as installed: parsed by the binaries, secrets only by path"
out="$(hyperbox-node serve --config /etc/hyperbox/node.toml --check-config)" ||
  fail "hyperbox-node --check-config of the shipped node.toml"
grep -qx '# state-dir = "/var/lib/hyperbox"  # default' <<<"$out" || fail "node.toml check: $out"
set +e
out="$(hyperbox-operator git --config /etc/hyperbox/operator.toml --check-config 2>&1)"
rc=$?
set -e
[[ $rc == 2 ]] || fail "the shipped operator.toml (no repo) passed --check-config or failed with $rc: $out"
grep -q -- "--repo" <<<"$out" && grep -q "or set \`repo\` in /etc/hyperbox/operator.toml" <<<"$out" ||
  fail "the operator's error does not point at repo in operator.toml: $out"
# An inline secret is refused with the line; the file is put back as shipped.
cp /etc/hyperbox/node.toml "$work/node.toml.orig"
printf 'token = "s3cret"\n' >>/etc/hyperbox/node.toml
set +e
out="$(hyperbox-node serve --config /etc/hyperbox/node.toml --check-config 2>&1)"
rc=$?
set -e
line="$(wc -l </etc/hyperbox/node.toml)"
[[ $rc == 2 ]] && grep -q "node.toml:$line: token: secrets are not accepted inline" <<<"$out" ||
  fail "an inline token in node.toml: exit $rc: $out"
cp "$work/node.toml.orig" /etc/hyperbox/node.toml
echo "ok: node.toml checks; operator.toml asks for repo; an inline secret is refused at line $line" >&2

step "the node unit's ExecStart, as written, with node.toml edited (temp state and run dirs)"
node_unit=/lib/systemd/system/hyperbox-node.service
op_unit=/lib/systemd/system/hyperbox-operator.service
sock="$work/run/node.sock"
# The admin's way: set keys in the config file.
cat >>/etc/hyperbox/node.toml <<TOML
socket = "$sock"
state-dir = "$work/state"
run-dir = "$work/run"
cgroup-parent = "$cgroup_parent"
TOML
tests/install/execstart.py "$node_unit" --print >&2
tests/install/execstart.py "$node_unit" 2>"$work/node.log" &
node_pid=$!
pids+=("$node_pid")
wait_for 30 hyperbox-node --socket "$sock" node -o json || {
  cat "$work/node.log" >&2
  fail "the node did not serve $sock"
}
hyperbox-node --socket "$sock" get -o json | python3 -c 'import json,sys; json.load(sys.stdin)' ||
  fail "get -o json"
[[ "$(stat -c %a "$sock")" == 600 ]] || fail "$sock is not 0600"
echo "ok: the node serves $sock" >&2

step "the operator unit's ExecStart with the shipped operator.toml: refused, exit 2, no restart"
set +e
tests/install/execstart.py "$op_unit" >/dev/null 2>"$work/op-default.log"
rc=$?
set -e
[[ $rc == 2 ]] || fail "operator without a repo exited $rc, want 2: $(cat "$work/op-default.log")"
grep -q -- "--repo" "$work/op-default.log" || fail "the error does not name --repo: $(cat "$work/op-default.log")"
grep -q "RestartPreventExitStatus=2" "$op_unit" || fail "$op_unit restarts on exit 2"
echo "ok: $(head -1 "$work/op-default.log")" >&2

step "hyperbox-operator init writes operator.toml; the operator unit's ExecStart syncs onto the node"
git init -q -b main "$work/edge-repo"
git -C "$work/edge-repo" -c user.name=t -c user.email=t@t commit -q --allow-empty -m "empty edge repo"
head="$(git -C "$work/edge-repo" rev-parse HEAD)"
op_state="$work/operator-state"
# The README's first run: the shipped operator.toml holds no settings, so no --force.
hyperbox-operator init --repo "file://$work/edge-repo" --node "unix://$sock" >&2 ||
  fail "hyperbox-operator init over the shipped operator.toml"
set +e
out="$(hyperbox-operator init --repo "file://$work/edge-repo" --node "unix://$sock" 2>&1)"
rc=$?
set -e
[[ $rc != 0 ]] && grep -q "/etc/hyperbox/operator.toml exists: pass --force" <<<"$out" ||
  fail "init replaced a written operator.toml without --force: $out"
hyperbox-operator init --repo "file://$work/edge-repo" --node "unix://$sock" --force >&2 ||
  fail "hyperbox-operator init --force"
[[ "$(stat -c '%a %U:%G' /etc/hyperbox/operator.toml)" == "644 root:root" ]] ||
  fail "operator.toml written by init: $(stat -c '%a %U:%G' /etc/hyperbox/operator.toml)"
printf 'state-dir = "%s"\ninterval = "1s"\n' "$op_state" >>/etc/hyperbox/operator.toml
tests/install/execstart.py "$op_unit" 2>"$work/operator.log" &
op_pid=$!
pids+=("$op_pid")
applied() {
  hyperbox-operator status --state-dir "$op_state" -o json |
    python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(s.get("lastAppliedRevision") != sys.argv[1])' "$head"
}
wait_for 60 applied || {
  cat "$work/operator.log" >&2
  fail "the operator did not apply $head"
}
kill -0 "$op_pid" || fail "the operator exited"
echo "ok: the operator applied revision $head through the node's socket" >&2

step "stop: SIGTERM to each main process only (KillMode=process)"
kill -TERM "$op_pid"
wait "$op_pid" || true
kill -TERM "$node_pid"
wait "$node_pid" || fail "the node exited non-zero after SIGTERM: $(tail -5 "$work/node.log")"
pids=()
grep -q "containers left running for re-adoption" "$work/node.log" || fail "the node did not detach"
echo "ok: both stopped" >&2

step "dpkg -r: program files go, config and state stay"
echo 'label = ["site=test"]' >>/etc/hyperbox/node.toml
dpkg -r hyperbox >/dev/null
for f in /usr/bin/hyperbox-node /usr/bin/hyperbox-operator /lib/systemd/system/hyperbox-node.service \
  /lib/systemd/system/hyperbox-operator.service /usr/share/bash-completion/completions/hyperbox-node \
  /usr/share/man/man1/hyperbox-node.1.gz; do
  [[ ! -e "$f" ]] || fail "$f is left after dpkg -r"
done
grep -qx 'label = \["site=test"\]' /etc/hyperbox/node.toml || fail "node.toml edit lost by dpkg -r"
[[ -f /etc/hyperbox/operator.toml ]] || fail "operator.toml removed by dpkg -r"
[[ -d /var/lib/hyperbox && -d /var/lib/hyperbox-operator ]] || fail "state removed by dpkg -r"
dpkg-query -W -f='${Status}' hyperbox | grep -qx "deinstall ok config-files" || fail "status after -r"
# The README's way in: apt with a path (no downloads: every dependency is installed).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$deb" >/dev/null
grep -qx 'label = \["site=test"\]' /etc/hyperbox/node.toml || fail "node.toml edit lost by reinstall"
echo "ok: removed; the edited node.toml survives removal and a reinstall with apt-get" >&2

step "dpkg -P: config goes, state stays unless asked"
enabled=0
if systemctl enable hyperbox-operator.service >/dev/null 2>&1 &&
  [[ -L /etc/systemd/system/multi-user.target.wants/hyperbox-operator.service ]]; then
  enabled=1
fi
dpkg -P hyperbox 2>"$work/purge.log" >/dev/null
[[ ! -e /etc/hyperbox ]] || fail "/etc/hyperbox is left after purge"
[[ -d /var/lib/hyperbox && -d /var/lib/hyperbox-operator ]] || fail "state removed by a plain purge"
grep -q "state kept in /var/lib/hyperbox" "$work/purge.log" || fail "purge does not say the state is kept"
if ((enabled)); then
  [[ ! -e /etc/systemd/system/multi-user.target.wants/hyperbox-operator.service ]] ||
    fail "the enablement link dangles after purge"
  echo "ok: purge removed the enablement link" >&2
fi
dpkg-query -W -f='${Status}' hyperbox 2>/dev/null | grep -q "not-installed" ||
  [[ -z "$(dpkg-query -W -f='${Status}' hyperbox 2>/dev/null)" ]] || fail "still known to dpkg after purge"
if ((${#preexisting_state[@]} == 0)); then
  dpkg -i "$deb" >/dev/null
  touch /var/lib/hyperbox/marker
  HYPERBOX_PURGE_STATE=yes dpkg -P hyperbox >/dev/null
  [[ ! -e /var/lib/hyperbox && ! -e /var/lib/hyperbox-operator ]] ||
    fail "HYPERBOX_PURGE_STATE=yes dpkg -P left the state"
  echo "ok: purge keeps state; HYPERBOX_PURGE_STATE=yes purge removes it" >&2
else
  echo "skipped: purging state (state dirs existed before this test: ${preexisting_state[*]})" >&2
fi

step "upgrade from a package with .env settings: carried into the TOML files"
# The package before the TOML files shipped /etc/hyperbox/{node,operator}.env (conffiles, kept
# in tests/install/fixtures as they were). An old package made of just those is enough to
# give dpkg and the new postinst what they meet on such a box.
old="$work/old-root"
install -d "$old/DEBIAN" "$old/etc/hyperbox"
install -m 0644 tests/install/fixtures/node.env tests/install/fixtures/operator.env "$old/etc/hyperbox/"
printf '%s\n' /etc/hyperbox/node.env /etc/hyperbox/operator.env >"$old/DEBIAN/conffiles"
printf 'Package: hyperbox\nVersion: 0.0.9-1\nArchitecture: %s\nMaintainer: test <test@hyperbox.invalid>\nDescription: old settings only\n' \
  "$(dpkg --print-architecture)" >"$old/DEBIAN/control"
dpkg-deb --root-owner-group --build "$old" "$work/old.deb" >/dev/null
installed=1
dpkg -i "$work/old.deb" >/dev/null
# The admin had edited node.env; operator.env is as shipped.
sed -i -e 's|^HYPERBOX_STATE_DIR=.*|HYPERBOX_STATE_DIR=/srv/hyperbox state|' \
  -e 's|^HYPERBOX_NODE_ARGS=.*|HYPERBOX_NODE_ARGS=--label site=north --insecure-registry 10.0.0.5:5000|' \
  /etc/hyperbox/node.env
dpkg -i "$deb" >/dev/null 2>"$work/convert.log"
cat "$work/convert.log" >&2
[[ ! -e /etc/hyperbox/node.env && -f /etc/hyperbox/node.env.converted ]] ||
  fail "node.env was not converted: $(ls /etc/hyperbox)"
[[ ! -e /etc/hyperbox/operator.env && ! -e /etc/hyperbox/operator.env.converted ]] ||
  fail "the unedited operator.env was not removed: $(ls /etc/hyperbox)"
out="$(hyperbox-node serve --config /etc/hyperbox/node.toml --check-config)" ||
  fail "the converted node.toml does not parse"
for want in 'state-dir = "/srv/hyperbox state"  # /etc/hyperbox/node.toml' \
  'label = ["site=north"]  # /etc/hyperbox/node.toml' \
  'insecure-registry = ["10.0.0.5:5000"]  # /etc/hyperbox/node.toml'; do
  grep -qxF "$want" <<<"$out" || fail "converted node.toml: no '$want' in: $out"
done
grep -q "^# Converted from /etc/hyperbox/node.env" /etc/hyperbox/node.toml || fail "no conversion note"
cmp -s /etc/hyperbox/operator.toml node-runtime/packaging/etc/operator.toml || fail "operator.toml changed"
purge_env=()
((${#preexisting_state[@]})) || purge_env=(HYPERBOX_PURGE_STATE=yes)
env "${purge_env[@]}" dpkg -P hyperbox >/dev/null 2>&1
[[ ! -e /etc/hyperbox ]] || fail "/etc/hyperbox is left after purging a converted install: $(ls -A /etc/hyperbox)"
echo "ok: the edited node.env is in node.toml (and kept as node.env.converted); the unedited operator.env is gone; purge removes both" >&2
installed=0
echo "PASS: edge install" >&2
