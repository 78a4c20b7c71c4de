#!/usr/bin/env bash
# Build target/debian/tern_VERSION_ARCH.deb: the release binary, the agent's
# systemd unit (examples/systemd), and the man pages and shell completions,
# which the binary itself writes into target/packaging (generated, so not in
# git). Extra arguments go to `cargo deb`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release --bin tern
tern="${CARGO_TARGET_DIR:-target}/release/tern"
out=target/packaging
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
# Without the operator's TERN_* variables, so nothing of this shell's
# environment ends up in the pages.
env -u TERN_INVENTORY -u TERN_IDENTITY -u TERN_ANSWER_DEADLINE_MS \
    "$tern" man --dir "$out/man" >/dev/null
"$tern" completions bash >"$out/completions/tern.bash"
"$tern" completions zsh >"$out/completions/_tern"
"$tern" completions fish >"$out/completions/tern.fish"
cargo deb --no-build --strip "$@"
