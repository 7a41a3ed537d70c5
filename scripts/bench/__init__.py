"""The benchmark (``python scripts/bench``): one module per scenario (reference, ramp, naive, disk, pynwb,
finalize), the process sampling they share (procwatch), one measured recording (session) and the report."""
