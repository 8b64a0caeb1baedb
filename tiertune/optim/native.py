"""The native AdamW kernel's C source, compiled on first use and loaded with ctypes.

One call updates one flat fp32 view in place, bit for bit as torch's fused CPU AdamW would (the float
path of ``aten/src/ATen/native/cpu/FusedAdamKernel.cpp`` in ADAMW mode, as torch's x86 build compiles
it), and can write the new weights rounded to bf16 in the same pass: the 16-bit copy a mixed-precision
run needs, without reading the fp32 weights a second time.

torch's compiled kernel runs a vector loop of 8 floats (its AVX2 build, which torch also dispatches to on
AVX-512 machines) and a scalar tail, and its compiler fused different multiply-adds into each. Per
element, in float (the constants are computed in double, then rounded to float):

- ``p = p * (1 - lr * weight_decay)`` when decayed (the constant itself one double multiply-add);
- ``m = fma(w, g - m, m)`` with ``w = 1 - beta1`` (torch's lerp; ``fma(w - 1, g - m, g)`` when
  ``|w| >= 0.5``);
- ``v = fma((1 - beta2) * g, g, v * beta2)`` in the vector loop, ``fma(v, beta2, ((1 - beta2) * g) * g)``
  in the tail;
- ``p = p + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)``.

torch's threads split a tensor at multiples of the vector, so its tail is the last ``n % 8`` elements
whatever its thread count (observed with 1 to 32 threads). This kernel splits the rest between OpenMP
threads, whole cache lines each (the count it is given: torch's; one thread below 64K elements); loaded
after torch, it shares torch's OpenMP runtime (the same ``libgomp.so.1``) and so its thread pool.

The library is built with ``cc`` into the environment (``<sys.prefix>/torch_extensions/tiertune_native``),
under a name that hashes the source, the flags and the CPU model and features, so another machine sharing the
environment builds its own; concurrent processes each build to a temporary name and rename it into place.
Flags: ``-ffp-contract=off`` keeps every multiply-add the source does not fuse explicitly unfused (the C
spells out with ``fmaf`` exactly where torch's compiled kernel fuses); ``-fno-math-errno`` lets ``sqrtf``
vectorize; neither changes a result, and the kernel's own check (``kernels.load_native``) compares it with
torch's bit for bit before it is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tiertune.errors import ConfigError

COMPILER = "cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
INSTEAD = "install a C compiler with OpenMP (e.g. gcc), or set optim.kernel=torch"

SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum {
  LINE = 16,           /* fp32 elements in a 64-byte cache line: each thread updates whole lines */
  TORCH_VEC = 8,       /* fp32 elements in torch's vector (AVX2) */
  PARALLEL_MIN = 65536 /* fewer elements than this run on one thread */
};

typedef struct {
  float decay;         /* 1 - lr * weight_decay; 1 when not decayed (torch skips the multiply) */
  float coeff;         /* the lerp's weight w = 1 - beta1, or w - 1 when |w| >= 0.5 */
  int from_avg;        /* |w| < 0.5: m + w * (g - m), else g + (w - 1) * (g - m) */
  float beta2, sq_weight, bias_correction2_sqrt, eps, neg_step_size;
} adamw_t;

/* torch's float -> bf16 (its vectorized conversion): round to nearest even, any NaN to 0xffff. */
static inline uint16_t to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return x != x ? 0xffff : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Elements [begin, end) as torch's vector loop computes them (tail = 0) or its scalar tail (tail = 1). */
static void span(const adamw_t *k, float *restrict p, const float *restrict g, float *restrict m,
                 float *restrict v, uint16_t *restrict out, int64_t begin, int64_t end, int tail) {
  const float decay = k->decay, coeff = k->coeff, beta2 = k->beta2, sq_weight = k->sq_weight;
  const float bc2_sqrt = k->bias_correction2_sqrt, eps = k->eps, neg_step_size = k->neg_step_size;
  const int decayed = decay != 1.0f, from_avg = k->from_avg;
  for (int64_t i = begin; i < end; i++) {
    float pi = p[i], gi = g[i], mi = m[i], vi = v[i];
    if (decayed) pi = pi * decay;
    mi = fmaf(coeff, gi - mi, from_avg ? mi : gi);
    vi = tail ? fmaf(vi, beta2, (sq_weight * gi) * gi) : fmaf(sq_weight * gi, gi, vi * beta2);
    const float denom = sqrtf(vi) / bc2_sqrt + eps;
    pi = pi + (neg_step_size * mi) / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (out) out[i] = to_bf16(pi);
  }
}

/* One AdamW update of n elements; out (bf16, may be NULL) receives the new weights. */
void tiertune_adamw(float *p, const float *g, float *m, float *v, uint16_t *out, int64_t n,
                    double decay, double lerp_weight, double beta2, double sq_weight,
                    double bias_correction2_sqrt, double eps, double neg_step_size, int64_t threads) {
  const float w = (float)lerp_weight;
  const int from_avg = fabsf(w) < 0.5f;
  const adamw_t k = {(float)decay, from_avg ? w : w - 1.0f, from_avg, (float)beta2, (float)sq_weight,
                     (float)bias_correction2_sqrt, (float)eps, (float)neg_step_size};
  const int64_t vectors = n / TORCH_VEC * TORCH_VEC; /* torch's vector loop; its scalar tail: the rest */
  if (n < PARALLEL_MIN || threads < 2) {
    span(&k, p, g, m, v, out, 0, vectors, 0);
  } else {
#pragma omp parallel num_threads(threads)
    {
      const int64_t team = omp_get_num_threads(), lines = (vectors + LINE - 1) / LINE;
      const int64_t per = (lines + team - 1) / team * LINE, begin = omp_get_thread_num() * per;
      const int64_t end = begin + per < vectors ? begin + per : vectors;
      if (begin < end) span(&k, p, g, m, v, out, begin, end, 0);
    }
  }
  span(&k, p, g, m, v, out, vectors, n, 1);
}
"""


def cache_dir() -> Path:
    return Path(sys.prefix) / "torch_extensions" / "tiertune_native"


def _cpu_model() -> str:
    """The CPU's model name and its feature flags (a virtual machine may hide features its model has: a
    library built with -march=native where they were visible would not run there)."""
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "flags") and key.strip() not in found:
                    found[key.strip()] = value.strip()
    except OSError:
        pass
    return "\n".join(found.values()) or os.uname().machine


def library_path() -> Path:
    """Where this source, built with these flags for this CPU, lives once compiled."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_model()]).encode()).hexdigest()[:16]
    return cache_dir() / f"adamw-{key}.so"


def build() -> Path:
    """The compiled library, built now if this environment has none for this CPU; a :class:`ConfigError`
    says why it cannot be (no compiler, a compile error, a cache that cannot be written)."""
    path = library_path()
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            source, built = Path(tmp) / "adamw.c", Path(tmp) / "adamw.so"
            source.write_text(SOURCE)
            _compile(source, built)
            os.replace(built, path)  # another process's identical build may land first: either will do
    except OSError as e:
        why = f"cannot build into {path.parent} ({e}); make it writable, or set optim.kernel=torch"
        raise ConfigError([f"optim.kernel=native: {why}"]) from None
    return path


def _compile(source: Path, built: Path) -> None:
    """``cc`` on the source; a :class:`ConfigError` names what went wrong."""
    try:
        subprocess.run(
            [COMPILER, *FLAGS, "-o", str(built), str(source)], check=True, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise ConfigError(
            [f"optim.kernel=native: no C compiler (`{COMPILER}`) on the PATH; {INSTEAD}"]
        ) from None
    except subprocess.CalledProcessError as e:
        lines = e.stderr.strip().splitlines()
        error = next(
            (line for line in lines if "error" in line), lines[-1] if lines else f"exit {e.returncode}"
        )
        raise ConfigError([f"optim.kernel=native: `{COMPILER}` failed ({error}); {INSTEAD}"]) from None


def load() -> ctypes.CDLL:
    """The library, built if needed, with its function's signature declared (not yet checked against
    torch: :func:`tiertune.optim.kernels.load_native` does that)."""
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ConfigError([f"optim.kernel=native: cannot load {path} ({e}); {INSTEAD}"]) from None
    lib.tiertune_adamw.restype = None
    lib.tiertune_adamw.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [ctypes.c_double] * 7 + [ctypes.c_int64]
    )
    return lib
