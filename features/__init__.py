"""Stage one of imgsent: images -> frozen CNN -> HDF5 feature store."""
