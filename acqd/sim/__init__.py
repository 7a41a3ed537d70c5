"""The simulated rig and its ground truth: drivers that publish like real hardware, on device clocks
with drift, wander and faults, and the truth they were generated from, for tests, the demo and benchmarks.

Imports: the root modules and ``wire`` (it is a driver); never record, service, finalize or share.
"""
