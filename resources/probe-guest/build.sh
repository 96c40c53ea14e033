#!/usr/bin/env bash
# Builds the probe guest into a bare-metal ELF64 executable (loaded like a Linux vmlinux).
#
#   build.sh OUT.elf      build in release and copy the ELF to OUT.elf
#   build.sh --clippy     run clippy on the crate with the same flags (extra args go to clippy)
#   build.sh --test       run the crate's unit tests on the host (std, no bare-metal flags)
#
# Environment: PROBE_TARGET_DIR, the cargo target directory (default: target/ next to this
# script). Safe to call from another cargo build script: the variables that cargo sets for a
# build script, and that would change how this crate is built, are cleared first.
set -euo pipefail

die() {
    echo "probe-guest/build.sh: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 OUT.elf | --clippy [CLIPPY ARGS...] | --test [TEST ARGS...]" >&2
    exit 2
}

[ $# -ge 1 ] || usage

crate_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target_dir="${PROBE_TARGET_DIR:-$crate_dir/target}"

# A parent cargo (build.rs) exports these; each would redirect or alter this build.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET \
    RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER CARGO_TARGET_DIR CARGO_MAKEFLAGS \
    CARGO_PRIMARY_PACKAGE CARGO_BUILD_TARGET_DIR CARGO_MANIFEST_DIR CARGO_MANIFEST_PATH \
    CARGO_PKG_NAME TARGET HOST OUT_DIR OPT_LEVEL PROFILE DEBUG NUM_JOBS
while IFS='=' read -r name _; do
    case "$name" in
        CARGO_FEATURE_* | CARGO_CFG_*) unset "$name" ;;
    esac
done < <(env)

command -v "${CARGO:-cargo}" >/dev/null 2>&1 || die "cargo not found (PATH or \$CARGO)"

# Bare-metal flags: static code at fixed addresses, no C runtime or libc, our linker script,
# no build-id note, no unwind tables (panic = abort; .eh_frame is discarded anyway).
bare_metal_rustflags=(
    -C relocation-model=static
    -C force-unwind-tables=no
    -C link-arg=-nostartfiles
    -C link-arg=-nostdlib
    -C link-arg=-static
    -C link-arg=-no-pie
    -C link-arg=-Wl,--build-id=none
    -C link-arg=-Wl,-z,max-page-size=4096
    -C link-arg=-Wl,-z,norelro
    -C link-arg=-Wl,-T,"$crate_dir/link.ld"
)

# One flag per 0x1f-separated field, so a crate path with spaces survives.
encoded_rustflags="$(IFS=$'\x1f'; echo "${bare_metal_rustflags[*]}")"
cargo="${CARGO:-cargo}"

cd "$crate_dir"

case "$1" in
    --clippy)
        shift
        CARGO_ENCODED_RUSTFLAGS="$encoded_rustflags" \
            "$cargo" clippy --offline --release --target-dir "$target_dir" -- "$@"
        exit 0
        ;;
    --test)
        shift
        # Host unit tests link against std; keep them out of the bare-metal build's cache.
        "$cargo" test --offline --target-dir "$target_dir/host-test" "$@"
        exit 0
        ;;
    -*)
        usage
        ;;
esac

out="$1"
[ -n "$out" ] || usage
out_dir="$(dirname "$out")"
[ -d "$out_dir" ] || die "output directory $out_dir does not exist"

CARGO_ENCODED_RUSTFLAGS="$encoded_rustflags" \
    "$cargo" build --offline --release --target-dir "$target_dir" \
    || die "cargo build failed (crate: $crate_dir)"

elf="$target_dir/release/probe-guest"
[ -f "$elf" ] || die "cargo succeeded but $elf is missing"
cp "$elf" "$out.tmp.$$" || die "cannot write $out"
mv -f "$out.tmp.$$" "$out" || die "cannot write $out"
