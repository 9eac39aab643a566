# netd — the two commands a fresh machine needs: `make demo` and `make test`.
# Both install what is missing first (Debian packages), so nothing has to be set up by hand.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Everything the build, the tests and the demo use.
DEB_PACKAGES := build-essential pkg-config protobuf-compiler libprotobuf-dev clang libbpf-dev \
	iproute2 iputils-ping nftables iptables etcd-server etcd-client \
	iperf3 socat curl jq openssl xxd dnsutils containernetworking-plugins \
	libnftnl-dev libmnl-dev conntrack knot ethtool python3

# What `make deps` proves is there once it has installed: each entry is `path-or-command:package`.
# A file that only a *recommended* package brings (descriptor.proto comes from libprotobuf-dev,
# which protobuf-compiler merely recommends) is missing on a fresh machine, since deps installs
# with --no-install-recommends; this list makes that fail here, naming the package, instead of
# deep inside a build script.
DEB_REQUIRES := cc:build-essential pkg-config:pkg-config protoc:protobuf-compiler \
	/usr/include/google/protobuf/descriptor.proto:libprotobuf-dev \
	/usr/include/google/protobuf/struct.proto:libprotobuf-dev \
	clang:clang /usr/include/bpf/bpf_helpers.h:libbpf-dev \
	ip:iproute2 ping:iputils-ping nft:nftables iptables-restore:iptables \
	etcd:etcd-server etcdctl:etcd-client iperf3:iperf3 socat:socat curl:curl jq:jq \
	openssl:openssl xxd:xxd dig:dnsutils /usr/lib/cni/bridge:containernetworking-plugins \
	/usr/lib/cni/portmap:containernetworking-plugins \
	/usr/include/libnftnl/expr.h:libnftnl-dev /usr/include/libmnl/libmnl.h:libmnl-dev \
	conntrack:conntrack knotd:knot ethtool:ethtool python3:python3 nsenter:util-linux
BENCH_REQUIRES := dnsperf:dnsperf nsd:nsd

# What only the benchmarks use (the anchors they are measured against).
BENCH_PACKAGES := dnsperf nsd

# What only `make image` uses: mmdebstrap makes the image's root filesystem from Debian's packages,
# umoci unpacks the finished archive for the check, `file` and readelf (binutils) prove netd-cni static.
IMAGE_PACKAGES := mmdebstrap umoci file
IMAGE_REQUIRES := mmdebstrap:mmdebstrap umoci:umoci file:file readelf:binutils update-alternatives:dpkg \
	dpkg-deb:dpkg unshare:util-linux jq:jq

# What only the lifecycle test uses: a real container runtime (Debian's podman with runc, on its
# CNI network backend) that runs the image as deploy/kubernetes/netd.yaml specifies.
LIFECYCLE_PACKAGES := podman runc
LIFECYCLE_REQUIRES := podman:podman runc:runc conmon:conmon

.PHONY: all deps bench-deps check-deps build release test lint demo bench clean-netns
.PHONY: image-deps image netd-cni-static lifecycle-deps e2e-lifecycle

all: build

# Installs whichever of the Debian packages $(1) are missing (--no-install-recommends), then
# proves that the commands and files $(2) are there (check-deps).
define install_packages
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@$(MAKE) --no-print-directory check-deps REQUIRES="$(2)"
endef

deps:
	$(call install_packages,$(DEB_PACKAGES),$(DEB_REQUIRES))

# Fails naming every command or file that is missing and the Debian package to add for it.
check-deps:
	@bad=0; for req in $(REQUIRES); do \
		what=$${req%%:*}; pkg=$${req##*:}; \
		case $$what in /*) [ -e "$$what" ] ;; *) command -v "$$what" >/dev/null 2>&1 ;; esac \
			|| { echo "make deps: $$what is missing: add Debian package '$$pkg' to the Makefile" >&2; bad=1; }; \
	done; exit $$bad

bench-deps: deps
	$(call install_packages,$(BENCH_PACKAGES),$(BENCH_REQUIRES))

image-deps: deps
	$(call install_packages,$(IMAGE_PACKAGES),$(IMAGE_REQUIRES))

lifecycle-deps: image-deps
	$(call install_packages,$(LIFECYCLE_PACKAGES),$(LIFECYCLE_REQUIRES))

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --release --workspace --bins

# Every test: unit tests beside the code, component tests, and the multi-node end-to-end tests
# (real etcd, real kernel, network namespaces; needs root).
test: build
	$(CARGO) test --workspace --no-fail-fast

lint: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# A real 3-node cluster in network namespaces; KEEP=1 leaves it running for a look around.
demo: release
	NETD_BIN_DIR=$(CURDIR)/target/release bash deploy/demo/demo.sh

# Benchmarks against their anchors (not part of `make test`: timings are noisy here).
bench: release bench-deps
	$(CARGO) run --release -p netd-bench --bin overlay
	NETD_CNI=$(CURDIR)/target/release/netd-cni bash bench/cni/run.sh
	bash bench/proxy/run.sh
	$(CARGO) run --release -p netd-udp --example pair -- --seconds 5 --runs 5
	$(CARGO) run --release -p netd-ebpf --example sync_bench
	$(CARGO) run --release -p netd-ebpf --example conn_bench -- --services 10000 --endpoints 10
	bash bench/dns/run.sh

# netd-cni runs on the host (the DaemonSet's init container copies it to /opt/cni/bin), whose libc
# may be older than the image's: it is linked statically (glibc static-pie; it makes no name
# lookups, so glibc's NSS, which a static binary cannot load, is never needed). The explicit
# --target keeps RUSTFLAGS off build scripts and proc-macros, and puts it in target/<triple>/release.
HOST_TRIPLE = $(shell rustc -vV | sed -n 's/^host: //p')
netd-cni-static: deps
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release -p netd-cni --target $(HOST_TRIPLE)

# The OCI image (an oci-archive in target/image/, no registry or container tool needed): a minimal
# Debian root filesystem with netd, netd-cni and what they exec and load. Not part of `make test`
# (it downloads Debian packages). See deploy/image/build.sh; deploy/image/Containerfile is the same
# image for your own tools and base.
image: release netd-cni-static image-deps
	NETD=$(CURDIR)/target/release/netd NETD_CNI=$(CURDIR)/target/$(HOST_TRIPLE)/release/netd-cni \
		OUT=$(CURDIR)/target/image bash deploy/image/build.sh

# The lifecycle test (tests/tests/lifecycle.rs): the image run by podman as
# deploy/kubernetes/netd.yaml says on three test nodes, pods through netd's conflist, a Service
# and DNS, an upgrade under DNS load, the uninstall with `netd cleanup`, and an inventory of every
# kernel object and file before and after. Not part of `make test`: it needs the image, which
# downloads Debian packages. .ci/run calls it after `make test`.
e2e-lifecycle: image lifecycle-deps
	$(CARGO) test -p netd-tests --test lifecycle -- --ignored --nocapture

# Removes namespaces left by a test run that was killed (the harness also does this itself).
clean-netns:
	@for ns in $$(ip netns list | awk '{print $$1}' | grep -E '^(ntb-|netd-demo-)'); do \
		for p in $$(ip netns pids $$ns); do kill -9 $$p; done; ip netns del $$ns && echo "removed $$ns"; done
