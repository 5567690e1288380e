"""Stage 2, fold: the function-preserving rewrites of an F16 model. Scale Folding (`folding`, paper §4.3:
W·diag(s), γ/s), the off-grid rescaling for benchmarks (`offgrid`), and the source every method quantizes:
the model and calibration, folded when asked, with the run's output names and scratch space (`source`).

Floor 5: imports `calibration` and everything below it.
"""
