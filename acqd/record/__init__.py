"""One stream's path from its socket to its stream file.

``writer`` is the writer process (one per stream); ``ingest`` checks each chunk and extracts sync edges;
``streamfile`` owns the HDF5 stream file; ``video`` encodes camera frames to video files.
Imports: the root modules and ``wire``; never service, finalize or share.
"""
