#!/bin/sh
# An aarch64 Python 3.11 with onnxruntime and LiteRT, run under qemu-user on an x86 Debian 12
# machine, for benchmarks/portable_int8.py's ARM columns (int8 numerics on phone-class cores);
# with --executorch also DIR/python-et, the same Python with torch and ExecuTorch's runtime, for
# benchmarks/executorch_isa.py's ARM columns.
#
#   bash benchmarks/arm64/setup.sh [DIR] [--executorch]   (default /opt/arm64; needs apt and pip registries)
#
# Nothing is installed into the host: Debian's arm64 python3.11 and its libraries are unpacked
# into DIR/root (a private apt configuration downloads them), PyPI's aarch64 wheels go into
# DIR/site, and DIR/python runs `qemu-aarch64 -cpu $QEMU_CPU` on them (QEMU_CPU: any name from
# `qemu-aarch64 -cpu help`, default cortex-a76). qemu-user 7.2 shows the guest the host's x86
# /proc/cpuinfo, on which onnxruntime's CPU detection crashes, so each emulated core gets a root
# of its own (DIR/roots/CORE) whose proc/cpuinfo is written from that core's own HWCAP and MIDR
# (gen_cpuinfo.py, run inside the guest); qemu -L serves it in place of the host's.
# ExecuTorch's aarch64 pybindings link libtorch, and PyPI's aarch64 torch is a CUDA build whose CUDA
# wheels the registries do not all carry: DIR/python-et loads it against small stand-ins for the CUDA
# libraries (cuda_standins.py; a CPU-only process never calls them).
set -eu
dir=/opt/arm64 executorch=
for a in "$@"; do case $a in --executorch) executorch=1 ;; *) dir=$a ;; esac; done
here=$(cd "$(dirname "$0")" && pwd)
command -v qemu-aarch64 >/dev/null || apt-get install -y -qq qemu-user
mkdir -p "$dir/apt/state/lists/partial" "$dir/apt/cache/archives/partial" "$dir/apt/etc" "$dir/debs" "$dir/root"
cp /etc/apt/sources.list.d/debian.sources "$dir/apt/etc/" 2>/dev/null || cp /etc/apt/sources.list "$dir/apt/etc/debian.list"
touch "$dir/apt/state/status"
cat > "$dir/apt/apt.conf" <<CONF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State "$dir/apt/state";
Dir::State::status "$dir/apt/state/status";
Dir::Cache "$dir/apt/cache";
Dir::Etc::SourceList "/dev/null";
Dir::Etc::SourceParts "$dir/apt/etc";
Dir::Etc::Parts "/dev/null";
Acquire::Languages "none";
CONF
export APT_CONFIG="$dir/apt/apt.conf"
apt-get update -qq
(cd "$dir/debs" && apt-get download -qq gcc-12-base libbz2-1.0 libc6 libcom-err2 libcrypt1 libdb5.3 libexpat1 libffi8 \
    libatomic1 libgcc-s1 libgdbm6 libgomp1 libgssapi-krb5-2 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 liblzma5 libmd0 \
    libncursesw6 libnsl2 libpcre2-8-0 libpython3.11-minimal libpython3.11-stdlib libreadline8 libselinux1 libsqlite3-0 \
    libssl3 libstdc++6 libtinfo6 libtirpc-common libtirpc3 libuuid1 libzstd1 mailcap media-types python3.11-minimal \
    python3.11 readline-common zlib1g)
for d in "$dir"/debs/*.deb; do dpkg -x "$d" "$dir/root"; done
python -m pip install -q --target "$dir/site" --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 onnxruntime==1.32.0 numpy ai-edge-litert==2.3.0
cp "$here/gen_cpuinfo.py" "$dir/gen_cpuinfo.py"
cat > "$dir/python" <<WRAP
#!/bin/sh
cpu="\${QEMU_CPU:-cortex-a76}"
root="$dir/roots/\$cpu"
if [ ! -f "\$root/proc/cpuinfo" ]; then
    tmp=\$(mktemp -d "$dir/.root.XXXXXX") && mkdir "\$tmp/proc" && for d in lib usr etc; do ln -s "$dir/root/\$d" "\$tmp/\$d"; done
    qemu-aarch64 -L "$dir/root" -cpu "\$cpu" "$dir/root/usr/bin/python3.11" -I "$dir/gen_cpuinfo.py" "\$(getconf _NPROCESSORS_CONF)" \
        > "\$tmp/proc/cpuinfo" || { rm -rf "\$tmp"; exit 1; }
    mkdir -p "$dir/roots" && mv -T "\$tmp" "\$root" 2>/dev/null || rm -rf "\$tmp"
fi
export PYTHONPATH="\${ARM64_SITE:-$dir/site}" PYTHONNOUSERSITE=1
unset PYTHONHOME PYTHONSTARTUP QEMU_LD_PREFIX
exec qemu-aarch64 -L "\$root" -cpu "\$cpu" "$dir/root/usr/bin/python3.11" "\$@"
WRAP
chmod +x "$dir/python"
QEMU_CPU=cortex-a53 "$dir/python" -c "import platform, onnxruntime, ai_edge_litert.interpreter; print('aarch64 Python ready:', platform.machine(), 'onnxruntime', onnxruntime.__version__)"
[ -n "$executorch" ] || exit 0
command -v aarch64-linux-gnu-gcc >/dev/null || apt-get install -y -qq gcc-aarch64-linux-gnu
wheel="--python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: --platform manylinux_2_28_aarch64
    --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform any"
python -m pip install -q --target "$dir/site-et" $wheel --no-deps torch==2.14.1 executorch==1.5.1
# executorch's own requirements (its wheel was installed without them, to leave out torch's CUDA wheels)
python -m pip install -q --target "$dir/site-et" $wheel filelock typing-extensions sympy networkx jinja2 fsspec numpy \
    flatbuffers packaging pandas pyyaml ruamel.yaml tabulate "torchao>=0.18,<0.19" py-cpuinfo expecttest hypothesis kgb \
    parameterized requests hydra-core omegaconf mpmath==1.3.0
python "$here/cuda_standins.py" "$dir/site-et" "$dir/root" "$dir/standins"
cat > "$dir/python-et" <<WRAP
#!/bin/sh
ARM64_SITE="$dir/site-et" LD_LIBRARY_PATH="$dir/standins" exec "$dir/python" "\$@"
WRAP
chmod +x "$dir/python-et"
QEMU_CPU=cortex-a53 "$dir/python-et" -c "import platform, torch; from executorch.runtime import Runtime; print('aarch64 ExecuTorch ready:', platform.machine(), 'torch', torch.__version__)" 2>/dev/null ||
    { echo "$dir/python-et: torch or ExecuTorch did not load (run it by hand to see why)" >&2; exit 1; }
