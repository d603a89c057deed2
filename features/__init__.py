"""Stage one of imgsent: images -> frozen CNN -> HDF5 feature store."""
import os

# Before torch loads its OpenMP runtime: its threads sleep instead of spinning while they wait. Beside two busy
# processes a hidden-layer head's fit took 37x its time alone with spinning threads, 2.2x with sleeping ones (5%
# slower alone); one thread would change the results (benchmarks/contention.py). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Before numpy is imported: its arrays of 4 MiB and more are not advised onto huge pages. Under the common THP
# setting `defrag: madvise` that advice makes a first touch wait for the kernel to compact memory: a FER-sized
# store's read took 0.48-0.69 s against 0.36-0.44 s on small pages, and the default train-head 9.2-9.9 s against
# 9.0-9.6 s, 0.6-1.0 s less system time (4 runs each, alternated; docs/benchmarks.md). Set it yourself to override.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
