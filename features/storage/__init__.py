"""Stage one's storage: the HDF5 feature store, its stat cache, resumable chunks, locks and atomic outputs."""
