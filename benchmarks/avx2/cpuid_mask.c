/* LD_PRELOAD library: this process (and every thread and child it starts) sees the CPU as an
 * AVX2-only x86 (EPYC Rome class: no AVX-512, no VNNI of either kind, no AMX), while its code
 * still runs natively at full speed.
 *
 * Why: int8 kernels (onnxruntime's MLAS, XNNPACK, oneDNN, PyTorch's ATen) pick their code path
 * from CPUID once, at start-up. Running them under qemu -cpu EPYC-Rome gives the AVX2 kernels'
 * numbers but no timing (TCG is ~100x slower). Linux's CPUID faulting (arch_prctl
 * ARCH_SET_CPUID, the cpuid_fault flag in /proc/cpuinfo) turns every CPUID instruction of the
 * thread into SIGSEGV; the handler here answers it with the real CPUID minus the masked
 * features. The setting survives fork and clone and is reset on execve, where LD_PRELOAD (kept
 * in the environment) installs it again.
 *
 * What it cannot hide: the dynamic loader and glibc read CPUID before any preloaded constructor
 * runs, so glibc's own string functions may still use AVX-512; /proc/cpuinfo is the kernel's and
 * unchanged. Timings are the AVX2 kernels on this core's micro-architecture, not on a real Rome.
 *
 * SIGSEGV handlers the program installs (Python's faulthandler, pytest) are kept and called for
 * every fault that is not a CPUID, so crash reports still work, except for a stack overflow (the
 * handler runs on the thread's stack; EDGEKD_CPUID_MASK_DEBUG=1 prints where a real fault hit). */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;
static struct sigaction program_handler; /* what the program asked for SIGSEGV */

#define BIT(n) (1u << (n))

static void masked_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1); /* per thread: other threads keep faulting */
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* ECX: AVX512 VBMI, VBMI2, GFNI, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ (Rome has none) */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(8) | BIT(9) | BIT(10) | BIT(11) | BIT(12) | BIT(14));
        /* EDX: AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA; EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16, AVX10 */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        r[3] &= ~(BIT(4) | BIT(5) | BIT(10) | BIT(19));
    } else if (leaf == 0x1e || leaf == 0x1d || leaf == 0x24) { /* AMX tile and AVX10 leaves */
        r[0] = r[1] = r[2] = r[3] = 0;
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    const unsigned char *ip = (const unsigned char *)uc->uc_mcontext.gregs[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned r[4];
        masked_cpuid((unsigned)uc->uc_mcontext.gregs[REG_RAX], (unsigned)uc->uc_mcontext.gregs[REG_RCX], r);
        uc->uc_mcontext.gregs[REG_RAX] = r[0];
        uc->uc_mcontext.gregs[REG_RBX] = r[1];
        uc->uc_mcontext.gregs[REG_RCX] = r[2];
        uc->uc_mcontext.gregs[REG_RDX] = r[3];
        uc->uc_mcontext.gregs[REG_RIP] += 2;
        return;
    }
    /* a real fault: say where (a crash under the mask should not look like the mask's), then the
     * program's handler, or the default action (the instruction faults again) */
    if (getenv("EDGEKD_CPUID_MASK_DEBUG")) {
        Dl_info where;
        char line[512];
        int n = dladdr(ip, &where) && where.dli_fname
            ? snprintf(line, sizeof line, "cpuid_mask: SIGSEGV (code %d) at %s+0x%lx, address %p\n", info->si_code,
                       where.dli_fname, (unsigned long)((const char *)ip - (const char *)where.dli_fbase), info->si_addr)
            : snprintf(line, sizeof line, "cpuid_mask: SIGSEGV (code %d) at %p, address %p\n", info->si_code,
                       (const void *)ip, info->si_addr);
        if (write(2, line, (size_t)n) < 0) { /* nothing to do */ }
    }
    if (program_handler.sa_flags & SA_SIGINFO) {
        program_handler.sa_sigaction(sig, info, context);
    } else if (program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
        program_handler.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL);
    }
}

static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    /* on the thread's own stack: an alternate stack some library set up may be too small for the
     * AVX-512 register frame, and the kernel then kills the process instead of calling us */
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    real_sigaction(SIGSEGV, &sa, NULL);
}

/* The program may (re)install a SIGSEGV handler at any time: keep it for real faults, keep ours in place. */
int sigaction(int signum, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (signum != SIGSEGV) { /* a handler running with SIGSEGV blocked could not answer a CPUID either */
        struct sigaction copy;
        if (act) {
            copy = *act;
            sigdelset(&copy.sa_mask, SIGSEGV);
        }
        return real_sigaction(signum, act ? &copy : NULL, old);
    }
    if (old)
        *old = program_handler;
    if (act)
        program_handler = *act;
    return 0;
}

/* A thread that blocks SIGSEGV (thread pools do, e.g. TBB's workers in OpenVINO) would be killed by
 * its first CPUID: a synchronous fault cannot wait while blocked. Blocking it defers nothing, so it is
 * left out of every mask the program sets. */
typedef int (*sigmask_fn)(int, const sigset_t *, sigset_t *);

static int without_segv(sigmask_fn real, int how, const sigset_t *set, sigset_t *old) {
    if (!set || how == SIG_UNBLOCK)
        return real(how, set, old);
    sigset_t copy = *set;
    sigdelset(&copy, SIGSEGV);
    return real(how, &copy, old);
}

int pthread_sigmask(int how, const sigset_t *set, sigset_t *old) {
    static sigmask_fn real;
    if (!real)
        real = (sigmask_fn)dlsym(RTLD_NEXT, "pthread_sigmask");
    return without_segv(real, how, set, old);
}

int sigprocmask(int how, const sigset_t *set, sigset_t *old) {
    static sigmask_fn real;
    if (!real)
        real = (sigmask_fn)dlsym(RTLD_NEXT, "sigprocmask");
    return without_segv(real, how, set, old);
}

sighandler_t signal(int signum, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    return sigaction(signum, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    memset(&program_handler, 0, sizeof program_handler);
    program_handler.sa_handler = SIG_DFL;
    install();
    /* Fails under an emulator (qemu-user does not implement it; its guest CPU is set by -cpu) and on
     * CPUs without CPUID faulting: said once, and the process runs unmasked (its reports then name
     * no hidden flags) rather than refusing to run. */
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char msg[] = "cpuid_mask: CPUID cannot fault here (no cpuid_fault, or an emulator); nothing is masked\n";
        if (write(2, msg, sizeof msg - 1) < 0) { /* nothing to do */ }
    }
}
