"""Video data every task reads: decoding (PyAV, torchcodec), video lists (the release's, Kinetics CSVs,
folders, ShapeWorld clips), clip sampling and transforms, and the clip batch streams."""
