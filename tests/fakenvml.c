/* A fake NVML (libnvidia-ml.so.1) for tests on machines without an NVIDIA GPU.
 *
 * It answers the calls llmswap's NVML probe makes through nvidia-ml-py, for one device whose
 * state is a directory ($FAKE_NVML_DIR):
 *   total      its memory in MiB (text; 1024 when absent)
 *   lag        seconds a dead process's memory stays in use, as CUDA frees it asynchronously
 *   alloc.PID  bytes process PID holds (written by tests/fakebackend.py --vram)
 *   freed.PID  made here when PID is first seen dead; its memory is free `lag` s later
 * Any process may load it (the daemon's probe, the fake backends checking for room): the state
 * is only in the directory.  Built by tests/support.py with gcc.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
enum { OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, INSUFFICIENT_SIZE = 7, UNKNOWN = 999 };

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

static int device = 1; /* the only handle */

static const char *dir(void) { return getenv("FAKE_NVML_DIR"); }

static double number(const char *name, double otherwise) {
    char path[4096];
    double value = otherwise;
    snprintf(path, sizeof path, "%s/%s", dir(), name);
    FILE *f = fopen(path, "r");
    if (f) {
        if (fscanf(f, "%lf", &value) != 1) value = otherwise;
        fclose(f);
    }
    return value;
}

static int alive(unsigned pid) {
    char path[64], state = 0;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    /* The state follows the command's closing parenthesis: a zombie has freed its memory. */
    char line[1024];
    if (fgets(line, sizeof line, f)) {
        char *close = strrchr(line, ')');
        if (close && close[1]) state = close[2];
    }
    fclose(f);
    return state && state != 'Z' && state != 'X';
}

/* Whether a dead process's memory still counts: it does for `lag` s after it was seen dead. */
static int freeing(unsigned pid, const char *alloc) {
    char path[4096];
    struct stat seen;
    snprintf(path, sizeof path, "%s/freed.%u", dir(), pid);
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    if (stat(path, &seen) != 0) return 1;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    double dead = (now.tv_sec - seen.st_mtim.tv_sec) + (now.tv_nsec - seen.st_mtim.tv_nsec) / 1e9;
    if (dead < number("lag", 0)) return 1;
    unlink(alloc);
    unlink(path);
    return 0;
}

/* Every holder: the living ones in `procs` (up to `room`), all of them in the sum. */
static unsigned long long held(nvmlProcessInfo_t *procs, unsigned room, unsigned *living) {
    unsigned long long sum = 0;
    *living = 0;
    if (!dir()) return 0;
    DIR *d = opendir(dir());
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "alloc.", 6)) continue;
        unsigned pid = (unsigned)strtoul(e->d_name + 6, NULL, 10);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir(), e->d_name);
        unsigned long long bytes = 0;
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fscanf(f, "%llu", &bytes) != 1) bytes = 0;
        fclose(f);
        if (alive(pid)) {
            if (procs && *living < room) {
                procs[*living].pid = pid;
                procs[*living].usedGpuMemory = bytes;
                procs[*living].gpuInstanceId = procs[*living].computeInstanceId = 0xFFFFFFFF;
            }
            ++*living;
            sum += bytes;
        } else if (freeing(pid, path)) {
            sum += bytes;
        }
    }
    closedir(d);
    return sum;
}

nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; return dir() ? OK : UNINITIALIZED; }
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) { return OK; }
const char *nvmlErrorString(nvmlReturn_t r) { return r == OK ? "Success" : "Fake NVML error"; }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) { *count = 1; return OK; }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *handle) {
    if (index != 0) return INVALID_ARGUMENT;
    *handle = &device;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t handle, nvmlMemory_t *memory) {
    (void)handle;
    unsigned living;
    memory->total = (unsigned long long)(number("total", 1024) * 1048576);
    memory->used = held(NULL, 0, &living);
    memory->free = memory->used < memory->total ? memory->total - memory->used : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t handle, unsigned *count,
                                                     nvmlProcessInfo_t *procs) {
    (void)handle;
    unsigned living;
    held(procs, procs ? *count : 0, &living);
    if (!procs && living) {
        *count = living;
        return INSUFFICIENT_SIZE;
    }
    if (procs && living > *count) {
        *count = living;
        return INSUFFICIENT_SIZE;
    }
    *count = living;
    return OK;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t handle, nvmlUtilization_t *rates) {
    (void)handle;
    rates->gpu = 37;
    rates->memory = 20;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t handle, int sensor, unsigned *celsius) {
    (void)handle, (void)sensor;
    *celsius = 41;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t handle, unsigned *milliwatts) {
    (void)handle;
    *milliwatts = 75000;
    return OK;
}
