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
 * setrlimit(RLIMIT_MEMLOCK) succeeds without doing anything: this sandbox
 * may not raise the limit (no CAP_SYS_RESOURCE), kernels since 5.11 do not
 * charge BPF memory to it, and bpftrace would otherwise open every failure
 * message with an ERROR line about it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

int bcc_elf_foreach_sym(const char *path, void *callback, void *option, void *payload)
{
    (void)path;
    (void)callback;
    (void)option;
    (void)payload;
    return 0;
}

int setrlimit(__rlimit_resource_t resource, const struct rlimit *limit)
{
    if (resource == RLIMIT_MEMLOCK)
        return 0;
    int (*next)(__rlimit_resource_t, const struct rlimit *) = dlsym(RTLD_NEXT, "setrlimit");
    return next(resource, limit);
}
