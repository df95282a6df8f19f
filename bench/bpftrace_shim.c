/*
 * LD_PRELOAD shim for bpftrace 0.17 as Debian builds it, used by
 * `cargo xtask bench` only when it runs bpftrace for the kernel's floor.
 *
 * bcc_elf_foreach_sym reports no symbols. Debian's bpftrace is built without
 * a disassembler, so it refuses every uprobe past a function's first byte
 * ("Can't check if uprobe is in proper place"), and memtrace probes free,
 * _PyObject_Free and _Py_NewReference a few bytes in. With no symbols in
 * sight, `bpftrace --unsafe` takes an address probe as a plain file offset,
 * which is how memtrace attaches too; memtrace's placement has already
 * checked that each offset starts an instruction.
 *
 * bpf_attach_uprobe scopes every uprobe to the process named by
 * BPFTRACE_SHIM_PID. bpftrace 0.17 attaches uprobes system-wide whatever
 * -p says (it passes the pid on for USDT only): every process on the
 * machine would take the floor's traps and add to its counts, whereas
 * memtrace attaches for one process.
 *
 * setrlimit(RLIMIT_MEMLOCK) succeeds without doing anything: this sandbox
 * may not raise the limit (no CAP_SYS_RESOURCE), kernels since 5.11 do not
 * charge BPF memory to it, and bpftrace would otherwise open every failure
 * message with an ERROR line about it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/types.h>

int bcc_elf_foreach_sym(const char *path, void *callback, void *option, void *payload)
{
    (void)path;
    (void)callback;
    (void)option;
    (void)payload;
    return 0;
}

int bpf_attach_uprobe(int progfd, int attach_type, const char *ev_name, const char *binary_path,
                      uint64_t offset, pid_t pid, uint32_t ref_ctr_offset)
{
    const char *scope = getenv("BPFTRACE_SHIM_PID");
    if (scope != NULL)
        pid = (pid_t)atoi(scope);
    int (*next)(int, int, const char *, const char *, uint64_t, pid_t, uint32_t) =
        dlsym(RTLD_NEXT, "bpf_attach_uprobe");
    return next(progfd, attach_type, ev_name, binary_path, offset, pid, ref_ctr_offset);
}

int setrlimit(__rlimit_resource_t resource, const struct rlimit *limit)
{
    if (resource == RLIMIT_MEMLOCK)
        return 0;
    int (*next)(__rlimit_resource_t, const struct rlimit *) = dlsym(RTLD_NEXT, "setrlimit");
    return next(resource, limit);
}
