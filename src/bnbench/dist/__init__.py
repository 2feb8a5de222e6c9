"""Many processes: the mesh of seed groups x data-parallel groups, launching, process groups, cross-process BN."""
