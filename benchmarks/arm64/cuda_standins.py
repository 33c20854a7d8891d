"""CUDA-free stand-ins for PyPI's aarch64 torch, so ExecuTorch's pybindings load on an emulated ARM core.

ExecuTorch's aarch64 pybindings link libtorch, and PyPI's aarch64 torch 2.14.1 is a CUDA build:
its libraries name libcudart, libcublas, libcudnn, NCCL and others as NEEDED, so the dynamic
loader refuses it without them, although a CPU-only process never calls into them (torch
initializes CUDA lazily). The CUDA wheels it pins are not all on the package registries for
aarch64, and the CPU-only build is on download.pytorch.org, out of reach here. So each library
it names and nothing here provides gets a small aarch64 stand-in: every symbol the torch
libraries import and nothing else defines, as a function that returns 100 (cudaErrorNoDevice),
under the soname and symbol version torch asks for. Only the loader ever touches them: ExecuTorch
programs run on the CPU (XNNPACK and portable kernels).

    python cuda_standins.py SITE SYSROOT OUT_DIR     (needs binutils and aarch64-linux-gnu-gcc)

SITE holds torch and executorch (pip --target), SYSROOT the Debian arm64 libraries (setup.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = ("Py", "_Py", "_ITM", "__gmon", "_Jv", "__cxa", "__libc", "_ZGTt", "_ZTH")  # Python's, or weak C++ runtime hooks


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _symbols(lib: Path, undefined: bool) -> set[str]:
    out = _run("nm", "-D", "--undefined-only" if undefined else "--defined-only", str(lib))
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def _version_needs(lib: Path) -> dict[str, set[str]]:
    """soname -> the symbol versions `lib` asks of it (readelf's version-needs section)."""
    needs: dict[str, set[str]] = {}
    current = None
    for line in _run("readelf", "-V", str(lib)).splitlines():
        if m := re.search(r"File: (\S+)", line):
            current = needs.setdefault(m.group(1), set())
        elif current is not None and (m := re.search(r"Name: (\S+)", line)):
            current.add(m.group(1))
    return needs


def main(site: Path, sysroot: Path, out: Path) -> int:
    torch_libs = list((site / "torch/lib").glob("*.so*"))
    libs = torch_libs + list((site / "executorch").rglob("*.so"))
    dirs = [sysroot / "lib/aarch64-linux-gnu", sysroot / "usr/lib/aarch64-linux-gnu", site / "torch/lib", site / "executorch/lib"]
    present = {p.name for d in dirs for p in d.glob("*")}
    needed = {n for lib in libs for n in re.findall(r"NEEDED.*\[(.+?)\]", _run("readelf", "-d", str(lib)))}
    missing = sorted(n for n in needed - present if n.startswith("lib") and not n.startswith("libatomic"))
    defined = set().union(*(_symbols(p, False) for d in dirs for p in d.glob("*.so*") if p.is_file()))
    wanted = set().union(*(_symbols(p, True) for p in torch_libs))
    stubs = sorted(s for s in wanted - defined if not s.startswith(SKIP))
    versions: dict[str, set[str]] = {}
    for lib in torch_libs:
        for soname, names in _version_needs(lib).items():
            versions.setdefault(soname, set()).update(names)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "standin.c")
        src.write_text("".join(f"int {s}(void) {{ return 100; }}\n" for s in stubs))
        for soname in missing:
            flags = []
            if versions.get(soname):  # one version node per name torch asks for; every symbol in the first
                first, *rest = sorted(versions[soname])
                script = Path(tmp, f"{soname}.map")
                script.write_text(f"{first} {{ global: *; }};\n" + "".join(f"{v} {{ }};\n" for v in rest))
                flags = [f"-Wl,--version-script={script}"]
            subprocess.run(["aarch64-linux-gnu-gcc", "-shared", "-fPIC", "-o", str(out / soname), f"-Wl,-soname,{soname}",
                            *flags, str(src)], check=True)
    print(f"{len(missing)} stand-in libraries ({', '.join(missing)}), {len(stubs)} symbols, in {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[2].strip())
    sys.exit(main(*map(Path, sys.argv[1:])))
