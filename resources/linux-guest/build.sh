#!/usr/bin/env bash
# Builds cgvm's Linux test guest from Debian packages, installing nothing into the host:
#   OUTDIR/vmlinuz             the kernel of Debian's linux-image-cloud-amd64 (a bzImage)
#   OUTDIR/initramfs.cpio.gz   busybox-static, that kernel's virtio modules, /init (see README.md)
#   OUTDIR/kernel-version      the kernel's release (what `uname -r` prints in the guest)
#   OUTDIR/disk.ext4           a 32 MiB ext4 image holding cgvm-check.txt, for /init's disk check
#
# usage: build.sh [--cache DIR] [--kernel-package PKG] OUTDIR
#   --cache DIR            where the downloaded .debs are kept (default OUTDIR/.cache)
#   --kernel-package PKG   the kernel metapackage (default linux-image-cloud-amd64) or a
#                          linux-image-<version>-<flavour> package
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KERNEL_METAPACKAGE=linux-image-cloud-amd64
# mkfs.ext4 and debugfs live in /sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

# The disk image: /cgvm-check.txt holds DISK_CHECK_LINE, which /init's disk check expects (the
# initramfs gets the same line in /etc/cgvm/disk-check). Fixed UUID and hash seed, so that the
# same e2fsprogs gives the same bytes.
DISK_SIZE_MIB=32
DISK_LABEL=cgvm-check
DISK_UUID=6367766d-6469-736b-8000-000000000001
DISK_CHECK_LINE="cgvm ext4 disk ok"

# The modules the guest loads, by module name (dashes written as underscores), roughly in load
# order; their dependencies are added from modules.dep. Ones built into the kernel or missing from
# it are recorded as such and skipped by /init. Both virtio transports are here: virtio_mmio
# (cgvm --transport mmio) and virtio_pci with the two libraries it needs in 6.x kernels
# (--transport pci, the default for a bzImage); older kernels without the libraries record them
# as absent.
WANTED_MODULES=(
	virtio_ring virtio virtio_mmio
	virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
	virtio_blk
	failover net_failover virtio_net
	virtio_rng
	vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
	crc16 crc32c_generic mbcache jbd2 ext4
	pvpanic pvpanic_mmio
)

die() {
	echo "build.sh: error: $*" >&2
	exit 1
}

log() {
	echo "build.sh: $*" >&2
}

# usage [STATUS]: prints the header comment of this script and exits (default status 2).
usage() {
	awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
	exit "${1:-2}"
}

# --- arguments ----------------------------------------------------------------------------------

OUTDIR=""
CACHE=""
while [ $# -gt 0 ]; do
	case "$1" in
	--cache) CACHE=${2:?--cache needs a directory}; shift 2 ;;
	--kernel-package) KERNEL_METAPACKAGE=${2:?--kernel-package needs a name}; shift 2 ;;
	-h | --help) usage 0 ;;
	-*) die "unknown option $1 (see --help)" ;;
	*)
		[ -z "$OUTDIR" ] || die "one OUTDIR only (see --help)"
		OUTDIR=$1
		shift
		;;
	esac
done
[ -n "$OUTDIR" ] || usage
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE=${CACHE:-$OUTDIR/.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cgvm-linux-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- build tools --------------------------------------------------------------------------------

# require_tool COMMAND PACKAGE: as root, installs PACKAGE when COMMAND is missing.
require_tool() {
	if command -v "$1" >/dev/null; then
		return 0
	fi
	if [ "$(id -u)" -eq 0 ]; then
		log "installing $2 (for $1)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >&2 ||
			die "could not install $2"
	else
		die "$1 is missing: install the Debian package $2 (apt-get install $2)"
	fi
}

check_tools() {
	for tool in apt-get apt-cache dpkg-deb gzip sort find truncate; do
		command -v "$tool" >/dev/null || die "$tool is missing (this script needs a Debian host)"
	done
	require_tool cpio cpio
	require_tool cc gcc
	require_tool mkfs.ext4 e2fsprogs
	require_tool debugfs e2fsprogs
}

# --- packages -----------------------------------------------------------------------------------

APT_UPDATED=0

# candidate_version PKG: the version apt-get download would fetch; nothing when apt knows none.
candidate_version() {
	{ apt-cache show --no-all-versions "$1" 2>/dev/null || true; } |
		sed -n 's/^Version: //p' | sed -n 1p
}

# lookup PKG: sets VERSION to PKG's candidate version; when apt does not know PKG, runs
# apt-get update once (as root) or fails.
lookup() {
	VERSION=$(candidate_version "$1")
	if [ -n "$VERSION" ]; then
		return 0
	fi
	if [ "$(id -u)" -eq 0 ] && [ "$APT_UPDATED" -eq 0 ]; then
		log "apt does not know $1; running apt-get update"
		apt-get update >&2 || die "apt-get update failed"
		APT_UPDATED=1
		VERSION=$(candidate_version "$1")
	fi
	if [ -z "$VERSION" ]; then
		if [ "$APT_UPDATED" -eq 1 ]; then
			die "apt knows no package $1, even after apt-get update"
		fi
		die "apt knows no package $1 (run apt-get update as root?)"
	fi
}

# resolve_kernel_package: sets KERNEL_PACKAGE to the linux-image-<version>-<flavour> package
# behind $KERNEL_METAPACKAGE.
resolve_kernel_package() {
	case "$KERNEL_METAPACKAGE" in
	linux-image-[0-9]*)
		KERNEL_PACKAGE=$KERNEL_METAPACKAGE
		return 0
		;;
	esac
	lookup "$KERNEL_METAPACKAGE"
	KERNEL_PACKAGE=$(apt-cache depends --important "$KERNEL_METAPACKAGE" |
		sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | sed -n 1p)
	[ -n "$KERNEL_PACKAGE" ] || die "$KERNEL_METAPACKAGE depends on no linux-image-<version> package"
}

# cached_deb PKG VERSION: prints the cached .deb of PKG VERSION, if any. apt-get download names
# files PKG_VERSION_ARCH.deb, with the epoch's ':' written %3a.
cached_deb() {
	find "$CACHE" -maxdepth 1 -name "${1}_${2//:/%3a}_*.deb" | LC_ALL=C sort | sed -n 1p
}

# fetch PKG: sets FETCHED to PKG's candidate .deb in the cache, downloading it if needed.
fetch() {
	local pkg=$1 version
	lookup "$pkg"
	version=$VERSION
	FETCHED=$(cached_deb "$pkg" "$version")
	if [ -n "$FETCHED" ]; then
		log "using cached $(basename "$FETCHED")"
		return 0
	fi
	log "downloading $pkg $version"
	# As root, apt warns that its _apt user cannot write to the cache directory: harmless.
	(cd "$CACHE" && apt-get download "$pkg=$version" 2>&1 |
		{ grep -v '^W: Download is performed unsandboxed' || true; } >&2) ||
		die "apt-get download $pkg=$version failed"
	FETCHED=$(cached_deb "$pkg" "$version")
	[ -n "$FETCHED" ] || die "apt-get download left no .deb of $pkg $version in $CACHE"
}

# --- kernel -------------------------------------------------------------------------------------

# unpack_kernel DEB: unpacks into $WORK/kernel and sets KVER, KDIR (the unpacked tree) and MODDIR.
unpack_kernel() {
	KDIR=$WORK/kernel
	dpkg-deb -x "$1" "$KDIR"
	local vmlinuz
	vmlinuz=$(find "$KDIR/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | sed -n 1p)
	[ -n "$vmlinuz" ] || die "$(basename "$1") has no /boot/vmlinuz-*"
	KVER=${vmlinuz##*/vmlinuz-}
	MODDIR=$KDIR/lib/modules/$KVER
	[ -d "$MODDIR" ] || die "$(basename "$1") has no /lib/modules/$KVER"
	KCONFIG=$KDIR/boot/config-$KVER
	[ -f "$KCONFIG" ] || die "$(basename "$1") has no /boot/config-$KVER"
}

# kconfig SYMBOL: prints the kernel configuration's value of SYMBOL, or "n" when it is not set.
kconfig() {
	local value
	value=$(sed -n "s/^$1=//p" "$KCONFIG")
	echo "${value:-n}"
}

# Debian's package ships no modules.dep (its postinst runs depmod): make one with busybox depmod.
ensure_modules_dep() {
	if [ -f "$MODDIR/modules.dep" ]; then
		return 0
	fi
	"$BUSYBOX" depmod -b "$KDIR" "$KVER" || die "depmod of $KVER failed"
	[ -f "$MODDIR/modules.dep" ] || die "depmod made no modules.dep"
}

# --- modules ------------------------------------------------------------------------------------

declare -A MOD_PATH=()  # module name -> path relative to $MODDIR, as in modules.dep
declare -A MOD_DEPS=()  # module name -> names of the modules it needs
declare -A BUILTIN=()   # module name -> 1 when built into the kernel
declare -A VISITED=()
ORDER=()                # module names, dependencies first

# module_name PATH: sets MODNAME to the name of the module in PATH (kernel/.../virtio-rng.ko ->
# virtio_rng).
module_name() {
	MODNAME=${1##*/}
	MODNAME=${MODNAME%%.ko*}
	MODNAME=${MODNAME//-/_}
}

read_module_tables() {
	local target deps dep name line
	while IFS= read -r line; do
		target=${line%%:*}
		deps=${line#*:}
		module_name "$target"
		name=$MODNAME
		MOD_PATH[$name]=$target
		MOD_DEPS[$name]=""
		for dep in $deps; do
			module_name "$dep"
			MOD_DEPS[$name]+=" $MODNAME"
		done
	done <"$MODDIR/modules.dep"
	while IFS= read -r line; do
		if [ -n "$line" ]; then
			module_name "$line"
			BUILTIN[$MODNAME]=1
		fi
	done <"$MODDIR/modules.builtin"
}

# visit NAME: appends NAME to ORDER after its dependencies.
visit() {
	local name=$1 dep
	if [ -n "${VISITED[$name]:-}" ]; then
		return 0
	fi
	VISITED[$name]=1
	for dep in ${MOD_DEPS[$name]:-}; do
		visit "$dep"
	done
	ORDER+=("$name")
}

# Copies the modules (decompressed) into $ROOT and writes /etc/cgvm/modules for /init.
install_modules() {
	local name path src dst list=$ROOT/etc/cgvm/modules
	read_module_tables
	for name in "${WANTED_MODULES[@]}"; do
		visit "$name"
	done
	mkdir -p "$ROOT/etc/cgvm"
	: >"$list"
	for name in "${ORDER[@]}"; do
		if [ -n "${MOD_PATH[$name]:-}" ]; then
			path=${MOD_PATH[$name]}
			src=$MODDIR/$path
			dst=lib/modules/$KVER/${path%.ko*}.ko
			mkdir -p "$(dirname "$ROOT/$dst")"
			decompress_module "$src" "$ROOT/$dst"
			echo "$name /$dst" >>"$list"
			MODULES_REPORT+="  module   $name${MOD_DEPS[$name]:+ (needs${MOD_DEPS[$name]})}"$'\n'
		elif [ -n "${BUILTIN[$name]:-}" ]; then
			echo "$name builtin" >>"$list"
			MODULES_REPORT+="  built-in $name"$'\n'
		else
			echo "$name absent" >>"$list"
			MODULES_REPORT+="  absent   $name (not in this kernel's configuration)"$'\n'
		fi
	done
}

# decompress_module SRC DST: busybox insmod loads plain .ko files only.
decompress_module() {
	case "$1" in
	*.ko) cp "$1" "$2" ;;
	*.ko.xz) require_tool xz xz-utils; xz -dc "$1" >"$2" ;;
	*.ko.zst) require_tool zstd zstd; zstd -qdc "$1" >"$2" ;;
	*.ko.gz) gzip -dc "$1" >"$2" ;;
	*) die "unknown module file type: $1" ;;
	esac
}

# --- initramfs ----------------------------------------------------------------------------------

install_busybox() {
	local applet
	mkdir -p "$ROOT/bin" "$ROOT/sbin" "$ROOT/usr/bin" "$ROOT/usr/sbin"
	cp "$BUSYBOX" "$ROOT/bin/busybox"
	# One symlink per applet, where busybox --install would put it (bin/ls, sbin/insmod...).
	for applet in $("$BUSYBOX" --list-full); do
		[ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
	done
}

build_exit_helper() {
	cc -static -nostdlib -ffreestanding -fno-tree-loop-distribute-patterns -Os -Wall -Wextra \
		-fno-asynchronous-unwind-tables -fno-stack-protector -fno-pie -no-pie \
		-Wl,--build-id=none -s -o "$ROOT/bin/cgvm-exit" "$HERE/cgvm-exit.c" ||
		die "building cgvm-exit failed"
}

make_root() {
	ROOT=$WORK/root
	mkdir -p "$ROOT"/{dev,proc,sys,tmp,run,root,etc,mnt}
	install_busybox
	build_exit_helper
	install_modules
	cp "$HERE/init" "$ROOT/init"
	echo "$KVER" >"$ROOT/etc/cgvm/kernel-version"
	echo "$DISK_CHECK_LINE" >"$ROOT/etc/cgvm/disk-check"
	# No /dev/console node (a non-root build could not make one): the kernel's built-in
	# initramfs has it, and /init reopens the console after mounting devtmpfs anyway.
}

# Fixed modes and times, sorted names, root ownership, gzip without name or time: the same
# inputs give the same archive.
write_initramfs() {
	local out=$1 epoch=$EPOCH
	find "$ROOT" -type d -exec chmod 755 {} +
	find "$ROOT" -type f -exec chmod 644 {} +
	chmod 755 "$ROOT/init" "$ROOT/bin/busybox" "$ROOT/bin/cgvm-exit"
	find "$ROOT" -exec touch -h -d "@$epoch" {} +
	(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc --owner 0:0 --reproducible) | gzip -9 -n >"$out.tmp"
	mv "$out.tmp" "$out"
}

# --- disk image ---------------------------------------------------------------------------------

# An mke2fs.conf of our own, so that the host's /etc/mke2fs.conf (or a newer e2fsprogs' defaults:
# orphan_file, metadata_csum_seed...) does not decide the image's features. These are bookworm's
# ext4 defaults, which Linux has supported since 3.18; "small" (what mke2fs calls a file system
# under 512 MiB) would otherwise mean 1 KiB blocks.
write_mke2fs_conf() {
	cat >"$1" <<-'EOF'
		[defaults]
			base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
			default_mntopts = acl,user_xattr
			enable_periodic_fsck = 0
			blocksize = 4096
			inode_size = 256
			inode_ratio = 16384

		[fs_types]
			ext4 = {
				features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
			}
			small = {
				blocksize = 4096
				inode_ratio = 16384
			}
	EOF
}

# make_disk OUT: a DISK_SIZE_MIB ext4 image made with mkfs.ext4 -d from a directory holding
# cgvm-check.txt. Reproducible with the same e2fsprogs: fixed UUID, hash seed, label and
# features; E2FSPROGS_FAKE_TIME for the times mke2fs sets itself; and debugfs then sets the
# owner and the four times of every inode copied from the directory (mke2fs -d copies them from
# the files: the build user, the time they were made or last read).
make_disk() {
	local out=$1 src=$WORK/disk path field cmds=$WORK/disk.debugfs
	mkdir -p "$src"
	echo "$DISK_CHECK_LINE" >"$src/cgvm-check.txt"
	find "$src" -type d -exec chmod 755 {} +
	find "$src" -type f -exec chmod 644 {} +
	write_mke2fs_conf "$WORK/mke2fs.conf"
	rm -f "$out.tmp"
	truncate -s "${DISK_SIZE_MIB}M" "$out.tmp"
	MKE2FS_CONFIG=$WORK/mke2fs.conf E2FSPROGS_FAKE_TIME=$EPOCH SOURCE_DATE_EPOCH=$EPOCH \
		mkfs.ext4 -q -F -t ext4 -L "$DISK_LABEL" -U "$DISK_UUID" \
		-E "root_owner=0:0,hash_seed=$DISK_UUID" -d "$src" "$out.tmp" >&2 ||
		die "mkfs.ext4 of the disk image failed"
	: >"$cmds"
	while IFS= read -r path; do
		path=${path#.} # ./a/b -> /a/b, . -> (the root)
		path=${path:-/}
		for field in uid gid; do
			echo "set_inode_field $path $field 0" >>"$cmds"
		done
		for field in atime ctime mtime crtime; do
			echo "set_inode_field $path $field @$EPOCH" >>"$cmds"
		done
	done < <(cd "$src" && find . | LC_ALL=C sort)
	# debugfs reports a failed request on stderr but still exits 0: any such line is an error.
	if ! E2FSPROGS_FAKE_TIME=$EPOCH debugfs -w -f "$cmds" "$out.tmp" >"$WORK/debugfs.out" 2>&1 ||
		grep -v -e '^debugfs [0-9.]* (' -e '^debugfs: set_inode_field ' "$WORK/debugfs.out" | grep -q .; then
		cat "$WORK/debugfs.out" >&2
		die "debugfs could not fix the disk image's owners and times"
	fi
	mv "$out.tmp" "$out"
}

# --- main ---------------------------------------------------------------------------------------

report_kernel_config() {
	if [ "$(kconfig CONFIG_DEVPORT)" = y ]; then
		echo "kernel has CONFIG_DEVPORT=y: /init writes a failing verdict to /dev/port"
	else
		echo "kernel has no CONFIG_DEVPORT (no /dev/port): /init writes a failing verdict with" \
			"/bin/cgvm-exit; CONFIG_DEVMEM=$(kconfig CONFIG_DEVMEM) (boot timer via busybox devmem)"
	fi
	if [ "$(kconfig CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)" = y ]; then
		echo "kernel has CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y: virtio_mmio takes device= words" \
			"(but /init's insmod passes none: it finds the devices through ACPI, LNRO0005)"
	else
		echo "kernel has no CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES: virtio-mmio devices are found" \
			"through ACPI (LNRO0005) only, virtio_mmio.device= on the command line is ignored"
	fi
	echo "kernel has CONFIG_VIRTIO_PCI=$(kconfig CONFIG_VIRTIO_PCI) (virtio-pci devices are driven" \
		"once /init loads it when m), CONFIG_PCI_MMCONFIG=$(kconfig CONFIG_PCI_MMCONFIG) (ECAM" \
		"found through the ACPI MCFG table), CONFIG_PCI_MSI=$(kconfig CONFIG_PCI_MSI)"
}

main() {
	local kdeb bbdeb
	MODULES_REPORT=""
	check_tools
	resolve_kernel_package
	log "kernel package: $KERNEL_PACKAGE (from $KERNEL_METAPACKAGE)"
	fetch "$KERNEL_PACKAGE"
	kdeb=$FETCHED
	fetch busybox-static
	bbdeb=$FETCHED

	dpkg-deb -x "$bbdeb" "$WORK/busybox"
	BUSYBOX=$WORK/busybox/bin/busybox
	[ -x "$BUSYBOX" ] || die "$(basename "$bbdeb") has no /bin/busybox"

	unpack_kernel "$kdeb"
	# Every time in the outputs: the kernel image's.
	EPOCH=$(stat -c %Y "$KDIR/boot/vmlinuz-$KVER")
	ensure_modules_dep
	make_root
	write_initramfs "$OUTDIR/initramfs.cpio.gz"
	make_disk "$OUTDIR/disk.ext4"
	cp "$KDIR/boot/vmlinuz-$KVER" "$OUTDIR/vmlinuz.tmp"
	mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
	echo "$KVER" >"$OUTDIR/kernel-version"

	echo "built cgvm's Linux test guest in $OUTDIR:"
	echo "  vmlinuz             from $(basename "$kdeb"), $(stat -c %s "$OUTDIR/vmlinuz") bytes"
	echo "  initramfs.cpio.gz   busybox from $(basename "$bbdeb"), /init, $(grep -c ' /' "$ROOT/etc/cgvm/modules") modules, $(stat -c %s "$OUTDIR/initramfs.cpio.gz") bytes"
	echo "  kernel-version      $KVER"
	echo "  disk.ext4           ext4, ${DISK_SIZE_MIB} MiB, label $DISK_LABEL, UUID $DISK_UUID: /cgvm-check.txt = \"$DISK_CHECK_LINE\""
	report_kernel_config
	echo "modules, in /init's load order:"
	printf '%s' "$MODULES_REPORT"
}

main
