"""Tuning constants of the backends, in one place.

Plain module-level names, read by the backends at call time, so a test can
shrink them (``monkeypatch.setattr(_config, "CPU_CHUNK_BYTES", 64)``) to make
the many-chunk paths run on small arrays.
"""

#: Output bytes of one unit of CPU work. The Numba backend cuts every task into
#: boxes of at most this many bytes (whole rows when a row fits, else column or
#: element ranges of one row) and hands each thread groups of boxes of about
#: this size. Large enough that a box costs far more than its bookkeeping
#: (~10 us of copying at memory speed), small enough that two threads end together.
CPU_CHUNK_BYTES = 1 << 18

#: Runs of consecutive source units (``Task.runs``) shorter than this are merged
#: and gathered unit by unit through ``src``; longer runs are copied as blocks,
#: which LLVM vectorises. Matters when the inner size is 1 (Dense kernels).
CPU_GATHER_RUN = 16

#: Below this many output bytes in one ``run`` call the Numba backend works on the
#: calling thread: waking the thread pool costs microseconds when the machine is
#: idle and up to a scheduler time slice (milliseconds) when it is busy.
CPU_PARALLEL_MIN_BYTES = 1 << 20

#: How the Numba backend's OpenMP workers wait between parallel regions, or None to
#: leave it to ``OMP_WAIT_POLICY`` / the runtime. Read once, when the backend is
#: imported, and only if the user has not set ``OMP_WAIT_POLICY``. GNU OpenMP's
#: default spinning costs a 4-8 ms scheduler slice per region when other processes
#: keep the cores busy; "passive" costs ~10 us to wake a sleeping worker.
CPU_OMP_WAIT_POLICY = "passive"

#: CUDA (CuPy backend, kernels/split.cu): threads per block of the split kernel. The defaults
#: here (128 threads, 4 vectors, 8 blocks per SM) won benchmarks/gpu_tune.py's sweep of 13
#: settings on an H100 (2026-11-28: 0.65 of a device copy's bandwidth, mean over 8 cases, against
#: 0.44 for the earlier 256/4/1): 64 registers per thread, twice the warps in flight.
CUDA_THREADS_PER_BLOCK = 128

#: CUDA: 16-byte vectors each thread gathers per tile before it stores any, so
#: this many loads are in flight per thread. A tile is
#: CUDA_THREADS_PER_BLOCK * CUDA_VECTORS_PER_THREAD * 16 bytes of output.
CUDA_VECTORS_PER_THREAD = 4

#: CUDA: blocks of the split kernel each SM must be able to hold at once; the compiler
#: caps the registers per thread to allow it (``__launch_bounds__``). 1 leaves them free.
CUDA_MIN_BLOCKS_PER_SM = 8

#: CUDA: most blocks in one launch; past it the blocks walk the tiles grid-stride.
CUDA_MAX_BLOCKS = 1 << 24
