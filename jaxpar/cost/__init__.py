"""What a compiled step costs, read from the program without running it.

- `collectives`: the collectives of a compiled, partitioned program and the bytes they move.
- `projection`: a roofline of a program's kernels and collectives on named hardware
  (``--project``), with the table of chips and the latency floors it assumes.

This package imports, from the rest of jaxpar, only `jaxpar.core`.
"""
