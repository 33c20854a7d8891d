# Runs INSIDE the aarch64 guest (qemu-user). Prints a Linux-arm64-style /proc/cpuinfo
# built from the emulated CPU's real AT_HWCAP/AT_HWCAP2 (qemu's /proc/self/auxv) and MIDR_EL1.
import ctypes, mmap, os, struct, sys
H1 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg".split()
H2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1").split()
aux = open("/proc/self/auxv", "rb").read()
av = dict(struct.iter_unpack("<QQ", aux))
hw1, hw2 = av.get(16, 0), av.get(26, 0)
feats = [n for i, n in enumerate(H1) if hw1 >> i & 1] + [n for i, n in enumerate(H2) if hw2 >> i & 1]
# mrs x0, midr_el1 ; ret
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(struct.pack("<II", 0xD5380000, 0xD65F03C0))
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)()
ncpu = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
out = []
for p in range(ncpu):
    out.append("processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: %s\nCPU implementer\t: 0x%02x\n"
               "CPU architecture: 8\nCPU variant\t: 0x%x\nCPU part\t: 0x%03x\nCPU revision\t: %d\n"
               % (p, " ".join(feats), midr >> 24 & 0xFF, midr >> 20 & 0xF, midr >> 4 & 0xFFF, midr & 0xF))
sys.stdout.write("\n".join(out) + "\n")
