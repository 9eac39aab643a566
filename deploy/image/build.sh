#!/usr/bin/env bash
# Builds netd's container image as an OCI archive (oci-archive: an OCI image layout in one tar),
# with no registry, no container engine and no base image: a root filesystem made from Debian's
# own packages by mmdebstrap, plus netd and netd-cni. `make image` runs it (as root) with
#   NETD=      the release netd (linked against this machine's glibc, libnftnl and libmnl)
#   NETD_CNI=  netd-cni linked statically (the init container copies it onto the host)
#   OUT=       where the archive goes: $OUT/netd-<version>.oci.tar
# and then proves the archive complete (check_image, below). Load it with e.g.
#   skopeo copy oci-archive:target/image/netd-0.1.0.oci.tar docker://REGISTRY/netd:0.1.0
#   ctr -n k8s.io images import target/image/netd-0.1.0.oci.tar     (named docker.io/library/netd:0.1.0)
#
# What is in the image, and why (nothing else is):
#   RUNTIME_PACKAGES  what netd loads (libc6, libgcc-s1, libnftnl11, libmnl0: `readelf -d netd`)
#                     and executes (nft, iptables-restore/-save, conntrack); the Containerfile's
#                     runtime stage installs the same list (agent/tests/image.rs checks that).
#   SHELL_PACKAGE     the DaemonSet's init container runs `/bin/sh -c 'cp ... && mv ... && if [ ...'`:
#                     busybox (one 0.8 MB binary) with only SHELL_APPLETS linked in /bin.
#   CNI_PLUGINS       the reference plugins netd's conflist chains after netd-cni (portmap), from
#                     containernetworking-plugins, of which only these are extracted; the init
#                     container copies them onto a host that has none. Debian's are not static
#                     (glibc >= 2.34 on the host; see deploy/kubernetes/netd.yaml).
# No ca-certificates: netd trusts only the CAs it is given (--etcd-cafile; in a pod the service
# account's ca.crt); a kubeconfig without a CA would need the system roots (add the package then).
#
# The rootfs is Debian's --variant=extract: the packages' files, with no maintainer scripts run, so
# no dpkg, apt, perl or coreutils has to be in the image to run them. Of what those scripts do,
# only iptables' alternatives matter here (iptables-restore -> iptables-nft-restore, Debian's
# default); this script does that, and writes /var/lib/dpkg/status from the packages' control
# data so that scanners see every package and version. It is built from this machine's Debian
# release and apt sources (netd links this machine's glibc, so the image's must be the same
# release). Reproducible for the same binaries and the same mirror state: every mtime is
# SOURCE_DATE_EPOCH (default: the last commit's time), tar entries are sorted, owners numeric.
set -euo pipefail

RUNTIME_PACKAGES="libc6 libgcc-s1 libnftnl11 libmnl0 nftables iptables conntrack containernetworking-plugins"
SHELL_PACKAGE="busybox"
SHELL_APPLETS="sh cp mv ["
CNI_PLUGIN_DIR="/usr/lib/cni"
CNI_PLUGINS="portmap"
# What netd executes (agent/tests/image.rs finds them in its sources); the check runs each.
EXECS="nft iptables-restore iptables-save conntrack"
# Where the binaries go; the DaemonSet and the Containerfile use the same paths.
BIN_DIR="/usr/local/bin"
BINARIES="netd netd-cni"
# The image config: the DaemonSet's container runs exactly this (command + args).
ENTRYPOINT='["/usr/local/bin/netd"]'
CMD='["run"]'
IMAGE_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NAME="netd"

: "${NETD:?NETD= path of the release netd binary}" "${NETD_CNI:?NETD_CNI= path of the static netd-cni}" "${OUT:?OUT= output directory}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VERSION=${VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml")}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
# The machine's own apt sources (deb822 or one-line): mmdebstrap pastes the file into the build.
APT_SOURCES=${APT_SOURCES:-$(for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do [ -s "$f" ] && { echo "$f"; break; }; done)}
SUITE=${SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}
ARCH=$(dpkg --print-architecture)
MULTIARCH=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
ARCHIVE="$OUT/$NAME-$VERSION.oci.tar"
WORK="$OUT/work"

die() { echo "image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root and chroot)"
[ -n "$APT_SOURCES" ] || die "no apt sources found (set APT_SOURCES= to a sources file)"
[ -n "$VERSION" ] && [ -n "$SUITE" ] || die "cannot tell the version ($VERSION) or the Debian suite ($SUITE)"
for b in "$NETD" "$NETD_CNI"; do [ -x "$b" ] || die "$b: no such executable"; done

# Reproducible tar: sorted, one mtime, numeric root ownership, no atime/ctime.
tar_repro() {
	tar --create --sort=name --format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
		--mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner "$@"
}

build_rootfs() {
	local rootfs=$1 p
	# dpkg's path filters apply to the extraction: no docs (copyright files stay), man pages,
	# translations, iconv modules (nothing here converts character sets), systemd units or
	# initramfs hooks.
	mmdebstrap --mode=root --variant=extract --format=directory --skip=cleanup/apt/cache \
		--include="$RUNTIME_PACKAGES $SHELL_PACKAGE" \
		--setup-hook='for d in bin sbin lib lib64; do mkdir -p "$1/usr/$d"; ln -s "usr/$d" "$1/$d"; done' \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
		--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
		--dpkgopt="path-exclude=/usr/lib/$MULTIARCH/gconv/*" \
		--dpkgopt='path-exclude=/usr/lib/systemd/*' --dpkgopt='path-exclude=/usr/share/initramfs-tools/*' \
		--dpkgopt="path-exclude=$CNI_PLUGIN_DIR/*" $(for p in $CNI_PLUGINS; do printf -- "--dpkgopt=path-include=%s/%s " "$CNI_PLUGIN_DIR" "$p"; done) \
		"$SUITE" "$rootfs" "$APT_SOURCES"

	# /var/lib/dpkg/status from the extracted packages' control fields, sorted by name.
	local status="$rootfs/var/lib/dpkg/status"
	: > "$status"
	for deb in $(ls "$rootfs"/var/cache/apt/archives/*.deb | LC_ALL=C sort); do
		dpkg-deb --field "$deb" | sed '1a Status: install ok installed' >> "$status"
		echo >> "$status"
	done
	# What iptables' postinst does for IPv4 (netd runs iptables-restore/-save): nft first, as Debian.
	mkdir -p "$rootfs/etc/alternatives" "$rootfs/var/lib/dpkg/alternatives"
	update-alternatives --root "$rootfs" --quiet --install /usr/sbin/iptables iptables /usr/sbin/iptables-legacy 10 \
		--slave /usr/sbin/iptables-restore iptables-restore /usr/sbin/iptables-legacy-restore \
		--slave /usr/sbin/iptables-save iptables-save /usr/sbin/iptables-legacy-save
	update-alternatives --root "$rootfs" --quiet --install /usr/sbin/iptables iptables /usr/sbin/iptables-nft 20 \
		--slave /usr/sbin/iptables-restore iptables-restore /usr/sbin/iptables-nft-restore \
		--slave /usr/sbin/iptables-save iptables-save /usr/sbin/iptables-nft-save
	for p in $SHELL_APPLETS; do ln -s "$SHELL_PACKAGE" "$rootfs/usr/bin/$p"; done
	# Names resolve from /etc/hosts first, as on Debian (glibc's default without this file is
	# DNS first); the runtime provides /etc/hosts and /etc/resolv.conf.
	printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"

	# Nothing of the build stays: apt and dpkg's configuration (neither is in the image), this
	# machine's resolv.conf and hostname, mmdebstrap's fstab, device nodes (the runtime makes /dev),
	# logs, the directories the path filters emptied.
	rm -rf "$rootfs"/var/cache/apt "$rootfs"/var/lib/apt "$rootfs"/etc/apt "$rootfs"/etc/dpkg "$rootfs"/var/log/* \
		"$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname "$rootfs"/etc/fstab
	find "$rootfs/dev" -mindepth 1 -delete
	find "$rootfs/usr/share" "$rootfs/usr/lib" -type d -empty -delete
	# /run: iptables --wait takes /run/xtables.lock (the DaemonSet mounts the host's there).
	mkdir -p "$rootfs/run" "$rootfs/proc" "$rootfs/sys" "$rootfs$BIN_DIR"
	install -m 0755 "$NETD" "$rootfs$BIN_DIR/netd"
	install -m 0755 "$NETD_CNI" "$rootfs$BIN_DIR/netd-cni"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# One gzip layer, its config and manifest, as an OCI image layout tarred into $ARCHIVE.
write_archive() {
	local rootfs=$1 layout=$2
	mkdir -p "$layout/blobs/sha256"
	(cd "$rootfs" && ls -A | LC_ALL=C sort) > "$WORK/top"
	tar_repro -C "$rootfs" -f "$WORK/layer.tar" $(cat "$WORK/top")
	gzip -9 -n -c "$WORK/layer.tar" > "$WORK/layer.tar.gz"
	local diff_id layer created config manifest
	diff_id=$(sha "$WORK/layer.tar")
	layer=$(sha "$WORK/layer.tar.gz")
	mv "$WORK/layer.tar.gz" "$layout/blobs/sha256/$layer"
	created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
	jq -cnj --arg created "$created" --arg arch "$ARCH" --arg path "PATH=$IMAGE_PATH" --arg diff "sha256:$diff_id" \
		--argjson entrypoint "$ENTRYPOINT" --argjson cmd "$CMD" --arg version "$VERSION" '{
		created: $created, architecture: $arch, os: "linux",
		config: {Env: [$path], Entrypoint: $entrypoint, Cmd: $cmd,
			Labels: {"org.opencontainers.image.title": "netd", "org.opencontainers.image.version": $version}},
		rootfs: {type: "layers", diff_ids: [$diff]},
		history: [{created: $created, created_by: "deploy/image/build.sh"}]}' > "$WORK/config.json"
	config=$(sha "$WORK/config.json")
	jq -cnj --arg config "sha256:$config" --argjson csize "$(stat -c %s "$WORK/config.json")" \
		--arg layer "sha256:$layer" --argjson lsize "$(stat -c %s "$layout/blobs/sha256/$layer")" '{
		schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
		config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $config, size: $csize},
		layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $layer, size: $lsize}]}' > "$WORK/manifest.json"
	manifest=$(sha "$WORK/manifest.json")
	mv "$WORK/config.json" "$layout/blobs/sha256/$config"
	jq -cnj --arg m "sha256:$manifest" --argjson size "$(stat -c %s "$WORK/manifest.json")" --arg tag "$VERSION" \
		--arg name "docker.io/library/$NAME:$VERSION" '{
		schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
		manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $size,
			annotations: {"org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $name}}]}' > "$layout/index.json"
	mv "$WORK/manifest.json" "$layout/blobs/sha256/$manifest"
	printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
	tar_repro -C "$layout" -f "$ARCHIVE" oci-layout index.json blobs
}

# Proves the archive is a complete image: unpacked by an OCI tool (umoci, which checks every
# blob's digest), every program netd runs starts inside it (so each shared library it needs
# resolves there), netd's own iptables rules load with the image's iptables-restore (so its
# extension modules are there), nft loads a table, the DaemonSet's init container command works,
# and netd-cni runs with no root filesystem at all.
check_image() {
	local chk="$WORK/check" rootfs out
	mkdir -p "$chk/layout"
	tar -xf "$ARCHIVE" -C "$chk/layout"
	umoci unpack --image "$chk/layout:$VERSION" "$chk/bundle" > /dev/null
	rootfs="$chk/bundle/rootfs"
	[ "$(jq -c .process.args "$chk/bundle/config.json")" = "$(jq -cn --argjson e "$ENTRYPOINT" --argjson c "$CMD" '$e + $c')" ] \
		|| die "check: the image runs $(jq -c .process.args "$chk/bundle/config.json")"
	out=$(chroot "$rootfs" "$BIN_DIR/netd" --version) \
		|| { chroot "$rootfs" /lib64/ld-linux-x86-64.so.2 --list "$BIN_DIR/netd" >&2 || true; die "check: netd does not start in the image"; }
	[ "$out" = "netd $VERSION" ] || die "check: netd --version says '$out', the image is $VERSION"
	for tool in $EXECS; do
		env PATH="$IMAGE_PATH" chroot "$rootfs" "$tool" --version > /dev/null || die "check: $tool does not run in the image"
	done
	# In a network namespace of their own (gone when they exit): the host is not touched.
	out=$(PATH="$IMAGE_PATH" unshare --net chroot "$rootfs" /bin/sh -c 'iptables-restore && iptables-save -t nat' < "$ROOT/agent/proxy/golden/iptables.rules") \
		|| die "check: the image's iptables-restore cannot load netd's rules"
	grep -q -- '-A PREROUTING .*-j NETD-SERVICES' <<< "$out" || die "check: iptables-save does not show netd's rules"
	# nft has no modules of its own to load (all of it is libnftables, which --version loaded):
	# one table like netd's masquerade rules shows it programs the kernel from the image.
	out=$(PATH="$IMAGE_PATH" unshare --net chroot "$rootfs" /bin/sh -c 'nft -f - && nft list tables' <<-EOF
		table ip netd {
			chain postrouting { type nat hook postrouting priority srcnat; policy accept; ip saddr 10.244.0.0/16 masquerade fully-random; }
			chain raw_prerouting { type filter hook prerouting priority raw; policy accept; udp dport 8472 notrack; }
		}
		EOF
	) || die "check: the image's nft cannot load a table"
	grep -qx 'table ip netd' <<< "$out" || die "check: nft does not list the table it loaded"
	PATH="$IMAGE_PATH" unshare --net chroot "$rootfs" conntrack -L > /dev/null 2>&1 || die "check: conntrack cannot list the (empty) table"
	# The init container, exactly as the DaemonSet runs it.
	local -a init
	mapfile -t init < <(sed -n '/- name: install-cni/,/volumeMounts:/ s/^ *command: //p' "$ROOT/deploy/kubernetes/netd.yaml" | jq -r '.[]')
	[ "${#init[@]}" -gt 0 ] || die "check: no install-cni command in deploy/kubernetes/netd.yaml"
	mkdir -p "$rootfs/opt/cni/bin"
	chroot "$rootfs" "${init[@]}" || die "check: the init container's command fails in the image: ${init[*]}"
	cmp -s "$rootfs/opt/cni/bin/netd-cni" "$rootfs$BIN_DIR/netd-cni" || die "check: the init container did not install netd-cni"
	local p
	for p in $CNI_PLUGINS; do
		cmp -s "$rootfs/opt/cni/bin/$p" "$rootfs$CNI_PLUGIN_DIR/$p" || die "check: the init container did not install $p"
		env -i CNI_COMMAND=VERSION "$(command -v chroot)" "$rootfs" "/opt/cni/bin/$p" < /dev/null > /dev/null || die "check: $p does not run in the image"
	done
	[ "$(ls "$rootfs$CNI_PLUGIN_DIR" | tr '\n' ' ')" = "$CNI_PLUGINS " ] || die "check: $CNI_PLUGIN_DIR has $(ls "$rootfs$CNI_PLUGIN_DIR"), not only $CNI_PLUGINS"
	# netd-cni runs on the host, whatever its libc: statically linked, no interpreter, and it runs
	# in an empty root.
	local cni="$rootfs$BIN_DIR/netd-cni"
	file -b "$cni" | grep -Eq 'static(-pie| ) ?linked' || die "check: netd-cni is not static: $(file -b "$cni")"
	! readelf -lW "$cni" | grep -q 'Requesting program interpreter' || die "check: netd-cni asks for a program interpreter"
	mkdir -p "$chk/empty"
	cp "$cni" "$chk/empty/netd-cni"
	out=$(env -i CNI_COMMAND=VERSION "$(command -v chroot)" "$chk/empty" /netd-cni < /dev/null) || die "check: netd-cni does not run without a root filesystem"
	jq -e '.supportedVersions | index("1.1.0")' <<< "$out" > /dev/null || die "check: netd-cni VERSION said: $out"
	echo "image: check passed (umoci unpack; netd, nft, iptables-restore/-save, conntrack run; netd's rules load; init container installs netd-cni and $CNI_PLUGINS; netd-cni static)"
}

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
started=$(date +%s)
build_rootfs "$WORK/rootfs"
write_archive "$WORK/rootfs" "$WORK/layout"
check_image
uncompressed=$(stat -c %s "$WORK/layer.tar")
compressed=$(stat -c %s "$ARCHIVE")
rm -rf "$WORK"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "image: $NAME:$VERSION in $ARCHIVE: $(mib "$compressed") compressed (the archive), $(mib "$uncompressed") uncompressed; built in $(( $(date +%s) - started )) s"
