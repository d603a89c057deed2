"""Stage one of imgsent: images -> frozen CNN -> HDF5 feature store."""
import os

# Before torch loads its OpenMP runtime: its threads sleep instead of spinning while they wait. Beside two busy
# processes a hidden-layer head's fit took 37x its time alone with spinning threads, 2.2x with sleeping ones (5%
# slower alone); one thread would change the results (benchmarks/contention.py). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
