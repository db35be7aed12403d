#!/usr/bin/env bash
# scripts/vm.sh — a Debian 12 QEMU guest with the stock Debian kernel (netem, Open vSwitch).
#
# What it does:
#   setup        install the host packages it needs (QEMU, debootstrap), only those missing.
#   build        build (or reuse) a cached guest image from Debian packages only: debootstrap
#                minbase bookworm from the host's configured Debian mirror, ext4 -> qcow2. The
#                cache key is a hash of the package list and the build steps; a changed input
#                builds a new image. Needs root (debootstrap, chroot).
#   run [--out DIR] -- CMD
#                boot one guest on a throw-away overlay of the image (2 vCPU, 2 GiB), run CMD as
#                root in the project directory inside the guest, stream its output here, copy
#                what CMD wrote to $SLEDGE_VM_OUT into DIR, exit with CMD's exit code, power
#                the guest off and delete the overlay. The project directory (with its .venv;
#                same Debian Python as the guest) is shared read-only over 9p at the same
#                absolute path, so the venv works unchanged.
#   test [--out DIR]
#                `run` the network tests that need netem / Open vSwitch (GUEST_TESTS below).
#   cluster [--out DIR] -- CMD
#                boot two guests on a private host bridge (slgbr0, taps slgtap0/1, no host
#                address, IPv6 off, no routing or NAT; guests 10.213.7.1 and .2), root SSH
#                between them with a key made for this boot, and run CMD in guest 1 with
#                SLEDGE_CLUSTER_SERVER=10.213.7.2 and SLEDGE_CLUSTER_CONTROL=10.213.7.1 (guest
#                2 is a Mininet cluster server). Bridge, taps and both QEMUs go on exit. --out
#                DIR gets guest 1's $SLEDGE_VM_OUT, guest 2's in DIR/guest2.
#   cluster-test [--out DIR]
#                `cluster` the tests that need two machines (CLUSTER_TESTS below).
#   packages, tests
#                print the guest's package list / test list (the Vagrantfile uses both).
#
# What it does not: no network for `run`/`test` guests (for `cluster`, only the private
# bridge above: nothing reaches the host or beyond), no package install on the host except
# `setup`, no KVM on hosts without real hardware virtualisation (it uses QEMU's TCG emulator
# there: slow but works).
#
# Exit codes: CMD's own code after `run`/`test`; 0 for a good `build`; 2 bad arguments;
#   77 cannot run here (QEMU/host tools missing, no image, not root for build; automake's
#   "skipped" code, which no test runner uses for a failure);
#   76 the guest did not report a result (crash, boot failure, timeout: SLEDGE_VM_TIMEOUT s).
#
# Environment: SLEDGE_VM_CACHE (default build/vm in the project, git-ignored),
#   SLEDGE_VM_TIMEOUT (default 3600),
#   SLEDGE_VM_MEM (MiB, default 2048), SLEDGE_VM_CPUS (default 2); for `cluster`, guest 2 has
#   1 vCPU and SLEDGE_VM_MEM2 MiB (default 1536).
set -euo pipefail

PROJECT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SLEDGE_VM_CACHE:-$PROJECT/build/vm}
TIMEOUT=${SLEDGE_VM_TIMEOUT:-3600}
MEM=${SLEDGE_VM_MEM:-2048}
CPUS=${SLEDGE_VM_CPUS:-2}
SUITE=bookworm

# What a guest needs beyond a bare machine (kernel, init, Open vSwitch, SSH for the cluster
# edition), then scripts/setup.sh's own list, so the host's venv finds the same system packages
# in the guest. chromium (report screenshots) stays out: 300 MB the guest never uses.
GUEST_PACKAGES="systemd-sysv udev kmod linux-image-amd64 initramfs-tools openvswitch-switch
openvswitch-testcontroller python3 python3-distutils sudo openssh-server openssh-client"
setup_packages() {
    sed -n '/^APT_PKGS=(/,/)/p' "$PROJECT/scripts/setup.sh" | sed 's/APT_PKGS=(//; s/)//' \
        | tr -s ' \n' '\n' | grep -vx -e chromium -e ''
}
PACKAGES="$GUEST_PACKAGES $(setup_packages | tr '\n' ' ')"

die() { echo "vm.sh: $2" >&2; exit "$1"; }
usage() { die 2 "usage: scripts/vm.sh packages | tests | setup | build | run [--out DIR] -- CMD [ARGS...] | test [--out DIR] | cluster [--out DIR] -- CMD [ARGS...] | cluster-test [--out DIR]"; }

# The key covers what goes into the image (packages, suite, the build steps), not the rest of
# this script, so editing `run` does not cost a rebuild.
image_key() {
    { printf '%s\n' "$PACKAGES" "$SUITE"; declare -f cmd_build; } | sha256sum | cut -c1-16
}

need_tools() {
    local missing=() t
    for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
    if ((${#missing[@]})); then
        die 77 "cannot run here: missing ${missing[*]} (apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils debootstrap e2fsprogs)"
    fi
}

mirror() {
    local src=/etc/apt/sources.list.d/debian.sources
    local uri=""
    [[ -r $src ]] && uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
    echo "${uri:-http://deb.debian.org/debian}"
}

# ---------------------------------------------------------------- build
BUILD_ROOT="" BUILD_PID=""
build_cleanup() {
    local d
    if [[ -n $BUILD_PID ]]; then kill -- "-$BUILD_PID" 2>/dev/null || true; sleep 1; fi
    if [[ -n $BUILD_ROOT ]]; then
        for d in dev/pts dev sys proc; do
            mountpoint -q "$BUILD_ROOT/rootfs/$d" 2>/dev/null && umount -l "$BUILD_ROOT/rootfs/$d"
        done
        # never follow a bind mount that failed to detach into the host
        rm -rf --one-file-system "$BUILD_ROOT"
    fi
}

cmd_build() {
    need_tools debootstrap mkfs.ext4 qemu-img chroot
    [[ $(id -u) -eq 0 ]] || die 77 "cannot build here: debootstrap needs root"
    local key img
    key=$(image_key)
    img=$CACHE/$key
    if [[ -f $img/base.qcow2 && -f $img/vmlinuz && -f $img/initrd.img ]]; then
        echo "vm.sh: image $img is up to date" >&2
        return 0
    fi
    mkdir -p "$CACHE"
    BUILD_ROOT=$(mktemp -d "$CACHE/build.XXXXXX")
    trap build_cleanup EXIT
    trap 'exit 130' INT TERM
    local root=$BUILD_ROOT/rootfs t0=$SECONDS
    echo "vm.sh: debootstrap $SUITE from $(mirror) ..." >&2
    # In its own process group and waited for, so an INT/TERM stops it (bash runs traps only
    # between foreground commands) and build_cleanup can kill what it started.
    setsid debootstrap --variant=minbase \
        --include="$(echo "$PACKAGES" | tr -s ' \n' ',' | sed 's/,$//')" \
        "$SUITE" "$root" "$(mirror)" >"$BUILD_ROOT/debootstrap.log" 2>&1 &
    BUILD_PID=$!
    wait "$BUILD_PID" || { tail -20 "$BUILD_ROOT/debootstrap.log" >&2; die 1 "debootstrap failed"; }
    BUILD_PID=""
    echo "vm.sh: debootstrap done in $((SECONDS - t0)) s" >&2

    echo sledge-vm >"$root/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 sledge-vm\n' >"$root/etc/hosts"
    printf '/dev/vda / ext4 rw,relatime 0 1\n' >"$root/etc/fstab"
    # A small initramfs: the root disk is virtio.
    sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
    printf 'virtio_pci\nvirtio_blk\next4\n' >>"$root/etc/initramfs-tools/modules"
    local u
    for u in apt-daily.timer apt-daily-upgrade.timer getty@tty1.service serial-getty@ttyS0.service \
        serial-getty@ttyS1.service openvswitch-testcontroller.service e2scrub_all.timer \
        fstrim.timer systemd-timesyncd.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$u"
    done

    # The guest side of `run`: mount the shares, run the command, report, power off.
    cat >"$root/usr/local/sbin/sledge-guest-run" <<'EOF'
#!/bin/bash
# Runs the command the host put in the run share; output to ttyS1, exit code to the share.
set -u
proj=$(sed -n 's/.*sledge.proj=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /run/sledge "$proj"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 run /run/sledge
# Read-only, so caching is safe: importing torch is thousands of small reads, each a round
# trip through an emulated device without it.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 proj "$proj"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
rc=255
if [ -r /run/sledge/cmd ]; then
    export HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    cd "$proj" && bash /run/sledge/cmd >/dev/ttyS1 2>&1 </dev/null
    rc=$?
fi
echo "$rc" >/run/sledge/rc.tmp && mv /run/sledge/rc.tmp /run/sledge/rc
sync
systemctl poweroff --no-block
EOF
    chmod 755 "$root/usr/local/sbin/sledge-guest-run"
    cat >"$root/etc/systemd/system/sledge-run.service" <<'EOF'
[Unit]
Description=sledge: run the host's command
After=openvswitch-switch.service systemd-modules-load.service local-fs.target
Wants=openvswitch-switch.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/sledge-guest-run
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/sledge-run.service \
        "$root/etc/systemd/system/multi-user.target.wants/sledge-run.service"
    printf 'sch_netem\nopenvswitch\n9p\n9pnet_virtio\n' >"$root/etc/modules-load.d/sledge.conf"

    for u in proc sys dev dev/pts; do mount --bind "/$u" "$root/$u"; done
    chroot "$root" update-initramfs -u -k all >"$BUILD_ROOT/initramfs.log" 2>&1 \
        || { tail -20 "$BUILD_ROOT/initramfs.log" >&2; die 1 "update-initramfs failed"; }
    chroot "$root" apt-get clean
    for u in dev/pts dev sys proc; do umount -l "$root/$u"; done

    local out=$BUILD_ROOT/out size
    mkdir -p "$out"
    local k i
    k=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -1)
    i=$(find "$root/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -1)
    [[ -n $k && -n $i ]] || die 1 "no kernel/initrd under $root/boot"
    cp "$k" "$out/vmlinuz"
    cp "$i" "$out/initrd.img"
    size=$(( $(du -sm "$root" | cut -f1) + 700 ))
    mkfs.ext4 -q -F -L sledge-root -d "$root" "$BUILD_ROOT/root.ext4" "${size}M"
    qemu-img convert -O qcow2 "$BUILD_ROOT/root.ext4" "$out/base.qcow2"
    rm -rf "$img"
    mv "$out" "$img"
    echo "vm.sh: built $img in $((SECONDS - t0)) s ($(du -sh "$img/base.qcow2" | cut -f1))" >&2
}

# ---------------------------------------------------------------- run
RUN_DIR="" QPID="" TPID=""
run_cleanup() {
    if [[ -n $TPID ]]; then kill "$TPID" 2>/dev/null || true; fi
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null || true
        sleep 1
        kill -9 "$QPID" 2>/dev/null || true
    fi
    [[ -n $RUN_DIR ]] && rm -rf "$RUN_DIR"
}

accel_args() {
    if [[ -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
        echo "-accel kvm -cpu host"
    else
        echo "-accel tcg,thread=multi -cpu max"
    fi
}

# start_guest DIR IMG CPUS MEM [QEMU ARGS...]: boot a guest on an overlay in DIR (its share in
# DIR/share, console in DIR/console.log, the command's output in DIR/out) in the background;
# its PID in GUEST_PID.
GUEST_PID=""
start_guest() {
    local dir=$1 img=$2 cpus=$3 mem=$4 accel
    shift 4
    qemu-img create -q -f qcow2 -b "$img/base.qcow2" -F qcow2 "$dir/overlay.qcow2"
    accel=$(accel_args)
    # shellcheck disable=SC2086  # accel is a list of words
    qemu-system-x86_64 $accel -smp "$cpus" -m "$mem" -display none -no-reboot \
        -nodefaults -monitor none \
        -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 quiet panic=-1 sledge.proj=$PROJECT" \
        -drive "file=$dir/overlay.qcow2,if=virtio,format=qcow2" \
        -fsdev "local,id=proj,path=$PROJECT,security_model=none,readonly=on" \
        -device virtio-9p-pci,fsdev=proj,mount_tag=proj \
        -fsdev "local,id=run,path=$dir/share,security_model=none" \
        -device virtio-9p-pci,fsdev=run,mount_tag=run \
        -chardev "file,id=con,path=$dir/console.log,append=on" -serial chardev:con \
        -chardev "file,id=res,path=$dir/out,append=on" -serial chardev:res \
        "$@" </dev/null >"$dir/qemu.log" 2>&1 &
    GUEST_PID=$!
}

# parse_out ARGS: OUT_DIR from a leading `--out DIR`, CMD the words after it (and after an
# optional `--`), for run and cluster.
parse_out() {
    OUT_DIR=""
    while (($#)); do
        case $1 in
            --out) (($# >= 2)) || usage; OUT_DIR=$2; shift 2 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    CMD=("$@")
}

cmd_run() {
    parse_out "$@"
    set -- "${CMD[@]}"
    local outdir=$OUT_DIR
    (($#)) || usage
    need_tools qemu-system-x86_64 qemu-img
    local img
    img=$CACHE/$(image_key)
    [[ -f $img/base.qcow2 ]] || die 77 "cannot run here: no image at $img (run: sudo scripts/vm.sh build)"
    RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sgv-run.XXXXXX")
    trap run_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$RUN_DIR/share/out"
    # The command sees SLEDGE_VM_OUT, a writable folder that comes back to --out DIR.
    { printf 'export SLEDGE_VM_OUT=/run/sledge/out\nexec'; printf ' %q' "$@"; printf '\n'; } \
        >"$RUN_DIR/share/cmd"
    : >"$RUN_DIR/out"
    local t0=$SECONDS
    start_guest "$RUN_DIR" "$img" "$CPUS" "$MEM"
    QPID=$GUEST_PID
    tail -n +1 -f "$RUN_DIR/out" &
    TPID=$!
    local waited=0
    while kill -0 "$QPID" 2>/dev/null; do
        if ((waited >= TIMEOUT)); then
            echo "vm.sh: guest timed out after ${TIMEOUT} s" >&2
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    local qrc=0
    if kill -0 "$QPID" 2>/dev/null; then kill "$QPID" 2>/dev/null || true; fi
    wait "$QPID" 2>/dev/null || qrc=$?
    QPID=""
    sleep 0.5
    kill "$TPID" 2>/dev/null || true
    wait "$TPID" 2>/dev/null || true
    TPID=""
    if [[ ! -s $RUN_DIR/share/rc ]]; then
        if grep -q . "$RUN_DIR/qemu.log"; then head -5 "$RUN_DIR/qemu.log" >&2; fi
        tail -15 "$RUN_DIR/console.log" >&2 2>/dev/null || true
        if ((waited < 60)) && ((qrc != 0)); then
            die 77 "cannot run here: QEMU exited with $qrc after ${waited} s"
        fi
        die 76 "the guest reported no result after $((SECONDS - t0)) s"
    fi
    local rc
    rc=$(cat "$RUN_DIR/share/rc")
    if [[ -n $outdir ]]; then
        mkdir -p "$outdir"
        cp -r "$RUN_DIR/share/out/." "$outdir/"
        echo "vm.sh: the guest's files are in $outdir" >&2
    fi
    echo "vm.sh: guest run took $((SECONDS - t0)) s, command exit code $rc" >&2
    exit "$rc"
}

# ---------------------------------------------------------------- setup / test
HOST_PACKAGES=(qemu-system-x86 qemu-utils debootstrap e2fsprogs)
cmd_setup() {
    [[ $(id -u) -eq 0 ]] || die 77 "cannot set up here: apt-get needs root"
    local p missing=()
    for p in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    echo "vm.sh: apt-get install ${missing[*]}" >&2
    # Only what is missing, and nothing upgraded with it.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --no-upgrade "${missing[@]}" >/dev/null || die 77 "cannot set up here: apt-get failed"
}

# The network tests that run in the guest, where the kernel has netem and Open vSwitch, so
# `auto` picks the netem backend and OVS bridges: link emulation, the fidelity monitor's netem
# counters, OVS topologies, PSL's bytes on the wire, two schemes, a cut routed around (a netem
# cut) and a handover (OVS port moves). TCG makes a training run take minutes, so the rest of
# the scheme and PSL files stay on the host, and tests marked `guest_heavy` (the relay's own
# timing) are left out.
GUEST_TESTS=(tests/test_links_over_mininet.py tests/test_fidelity_over_mininet.py
             tests/test_topologies_over_mininet.py
             tests/test_psl_over_mininet.py::test_psl_trains_over_mininet_and_writes_results
             tests/test_psl_over_mininet.py::test_client_protocol_bytes_equal_activation_sizes_plus_headers
             tests/test_psl_over_mininet.py::test_kernel_interface_counters_agree_with_protocol_bytes
             tests/test_schemes_over_mininet.py::test_epsl_over_mininet_backprops_b_phi_plus_m_one_minus_phi_vectors
             tests/test_schemes_over_mininet.py::test_sflv1_over_mininet_leaves_every_client_the_average_and_computes_fedavg
             tests/test_scenario_over_mininet.py tests/test_migration_over_mininet.py)
cmd_test() {
    cmd_run "$@" -- .venv/bin/python -m pytest -q -ra -p no:cacheprovider \
        -m "net and not guest_heavy" --durations=10 "${GUEST_TESTS[@]}"
}

# ---------------------------------------------------------------- two guests (cluster)
# Two guests on a private host bridge, one tap each: guest 1 (10.213.7.1) runs the command, guest
# 2 (10.213.7.2) is a Mininet cluster server. The bridge has no host address, IPv6 is off on it
# and on the taps, nothing is routed or NATed: the /24 exists inside the bridge only. Root SSH
# between the guests with a key made for this boot (UseDNS no). Device names have a fixed
# prefix (slgbr0, slgtap0/1) and are removed on exit, with the two QEMU processes (by PID).
CL_BR=slgbr0 CL_TAPS=(slgtap0 slgtap1) CL_NET=10.213.7
CL_DIRS=() CL_PIDS=() CL_MADE=()
cluster_cleanup() {
    local p d
    if [[ -n $TPID ]]; then kill "$TPID" 2>/dev/null || true; fi
    for p in "${CL_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    ((${#CL_PIDS[@]})) && sleep 1
    for p in "${CL_PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for d in "${CL_MADE[@]}"; do ip link del "$d" 2>/dev/null || true; done
    for d in "${CL_DIRS[@]}"; do rm -rf "$d"; done
}

# The guest side: address, names, SSH (the key from the share); then wait for the other guest.
CL_PRELUDE='set -e
me=$SLEDGE_VM_INDEX mac=52:54:00:d7:07:0$SLEDGE_VM_INDEX dev=
for d in /sys/class/net/*; do if [ "$(cat "$d/address")" = "$mac" ]; then dev=${d##*/}; fi; done
[ -n "$dev" ] || { echo "no interface with $mac" >&2; exit 1; }
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
# GRE tunnels (the cluster links) load ip_gre, which adds gre0/gretap0/erspan0 for good:
# loaded first, so they are not counted as left behind by a test.
modprobe ip_gre
ip addr add "$SLEDGE_VM_NET.$me/24" dev "$dev" && ip link set "$dev" up
printf "%s vm1\n%s vm2\n" "$SLEDGE_VM_NET.1" "$SLEDGE_VM_NET.2" >>/etc/hosts
install -d -m 700 /root/.ssh
install -m 600 /run/sledge/id /root/.ssh/id_ed25519
install -m 600 /run/sledge/id.pub /root/.ssh/authorized_keys
printf "Host *\n  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n" >/root/.ssh/config
mkdir -p /etc/ssh/sshd_config.d
printf "UseDNS no\nPermitRootLogin prohibit-password\n" >/etc/ssh/sshd_config.d/sledge.conf
systemctl restart ssh
other=$SLEDGE_VM_NET.$((3 - me)) t0=$SECONDS
until ssh -o BatchMode=yes -o ConnectTimeout=5 "root@$other" true 2>/dev/null; do
    (( SECONDS - t0 < 900 )) || { echo "no SSH to $other after 900 s" >&2; exit 1; }
    sleep 2
done
echo "guest $me: SSH to $other after $((SECONDS - t0)) s"
set +e
'

# cluster [--out DIR] -- CMD: CMD in guest 1 with guest 2 as a cluster server; its environment
# has SLEDGE_CLUSTER_SERVER (guest 2) and SLEDGE_CLUSTER_CONTROL (guest 1's own address).
cmd_cluster() {
    parse_out "$@"
    set -- "${CMD[@]}"
    local outdir=$OUT_DIR
    (($#)) || usage
    [[ $(id -u) -eq 0 ]] || die 77 "cannot run here: a host bridge and taps need root"
    need_tools qemu-system-x86_64 qemu-img ip ssh-keygen
    local img i d dir
    img=$CACHE/$(image_key)
    [[ -f $img/base.qcow2 ]] || die 77 "cannot run here: no image at $img (run: sudo scripts/vm.sh build)"
    for d in "$CL_BR" "${CL_TAPS[@]}"; do
        ! ip link show "$d" >/dev/null 2>&1 || die 77 "cannot run here: $d exists (another cluster run?)"
    done
    trap cluster_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ip link add "$CL_BR" type bridge || die 77 "cannot run here: no bridge"
    CL_MADE+=("$CL_BR")
    sysctl -qw "net.ipv6.conf.$CL_BR.disable_ipv6=1"
    for d in "${CL_TAPS[@]}"; do
        ip tuntap add dev "$d" mode tap || die 77 "cannot run here: no tap device"
        CL_MADE+=("$d")
        sysctl -qw "net.ipv6.conf.$d.disable_ipv6=1"
        ip link set "$d" master "$CL_BR" up
    done
    ip link set "$CL_BR" up
    for i in 1 2; do
        dir=$(mktemp -d "${TMPDIR:-/tmp}/sgv-cl$i.XXXXXX")
        CL_DIRS+=("$dir")
        mkdir -p "$dir/share/out"
        : >"$dir/out"
    done
    ssh-keygen -q -t ed25519 -N '' -C "sledge-vm-$$" -f "${CL_DIRS[0]}/share/id"
    cp "${CL_DIRS[0]}/share/id" "${CL_DIRS[0]}/share/id.pub" "${CL_DIRS[1]}/share/"
    for i in 1 2; do
        dir=${CL_DIRS[i - 1]}
        {
            printf 'export SLEDGE_VM_OUT=/run/sledge/out SLEDGE_VM_INDEX=%s SLEDGE_VM_NET=%s\n' \
                "$i" "$CL_NET"
            printf 'export SLEDGE_CLUSTER_SERVER=%s.2 SLEDGE_CLUSTER_CONTROL=%s.1\n' \
                "$CL_NET" "$CL_NET"
            printf '%s\n' "$CL_PRELUDE"
            if ((i == 1)); then printf 'exec'; printf ' %q' "$@"; printf '\n'
            else printf 'exec sleep infinity\n'; fi
        } >"$dir/share/cmd"
    done
    local t0=$SECONDS
    # The server first (1 vCPU: it runs one node and a forwarder), then guest 1.
    start_guest "${CL_DIRS[1]}" "$img" 1 "${SLEDGE_VM_MEM2:-1536}" \
        -netdev "tap,id=n0,ifname=${CL_TAPS[1]},script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=52:54:00:d7:07:02"
    CL_PIDS+=("$GUEST_PID")
    start_guest "${CL_DIRS[0]}" "$img" "$CPUS" "$MEM" \
        -netdev "tap,id=n0,ifname=${CL_TAPS[0]},script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=52:54:00:d7:07:01"
    CL_PIDS+=("$GUEST_PID")
    local q1=$GUEST_PID q2=${CL_PIDS[0]} waited=0
    tail -n +1 -f "${CL_DIRS[0]}/out" &
    TPID=$!
    while kill -0 "$q1" 2>/dev/null; do
        if ((waited >= TIMEOUT)); then echo "vm.sh: guest 1 timed out after ${TIMEOUT} s" >&2; break; fi
        kill -0 "$q2" 2>/dev/null || { echo "vm.sh: guest 2 stopped" >&2; break; }
        sleep 1
        waited=$((waited + 1))
    done
    sleep 0.5
    kill "$TPID" 2>/dev/null || true
    wait "$TPID" 2>/dev/null || true
    TPID=""
    if [[ -n $outdir ]]; then
        mkdir -p "$outdir"
        cp -r "${CL_DIRS[0]}/share/out/." "$outdir/"
        mkdir -p "$outdir/guest2"
        cp -r "${CL_DIRS[1]}/share/out/." "$outdir/guest2/"
        cp "${CL_DIRS[1]}/out" "$outdir/guest2.out"
        cp "${CL_DIRS[1]}/console.log" "$outdir/guest2.console.log" 2>/dev/null || true
    fi
    if [[ ! -s ${CL_DIRS[0]}/share/rc ]]; then
        tail -15 "${CL_DIRS[0]}/console.log" >&2 2>/dev/null || true
        echo "vm.sh: guest 2's output:" >&2
        tail -20 "${CL_DIRS[1]}/out" >&2 2>/dev/null || true
        die 76 "guest 1 reported no result after $((SECONDS - t0)) s"
    fi
    local rc
    rc=$(cat "${CL_DIRS[0]}/share/rc")
    if [[ $rc != 0 ]]; then
        echo "vm.sh: guest 2's output (tail):" >&2
        tail -20 "${CL_DIRS[1]}/out" >&2 2>/dev/null || true
    fi
    echo "vm.sh: two-guest run took $((SECONDS - t0)) s, command exit code $rc" >&2
    exit "$rc"
}

# The test that needs two machines (Mininet's cluster edition), in two guests.
CLUSTER_TESTS=(tests/test_cluster_over_mininet.py)
cmd_cluster_test() {
    cmd_cluster "$@" -- .venv/bin/python -m pytest -q -ra -p no:cacheprovider -m net \
        --durations=5 "${CLUSTER_TESTS[@]}"
}

case ${1:-} in
    # The Vagrantfile provisions with the same packages and runs the same tests.
    packages) (($# == 1)) || usage; echo $PACKAGES ;;
    tests) (($# == 1)) || usage; echo "${GUEST_TESTS[@]}" ;;
    setup) (($# == 1)) || usage; cmd_setup ;;
    build) (($# == 1)) || usage; cmd_build ;;
    run) shift; cmd_run "$@" ;;
    test) shift; cmd_test "$@" ;;
    cluster) shift; cmd_cluster "$@" ;;
    cluster-test) shift; cmd_cluster_test "$@" ;;
    *) usage ;;
esac; exit "$?"  # on this line: bash reads a script as it runs, so an edit to this file
                 # during a long build or run must not be read as the next command
