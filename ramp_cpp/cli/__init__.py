"""The command line: the only package that imports typer and rich, prints or exits. It parses at the edge (a
type name becomes a `GGMLQuantizationType` here) and calls `pipeline` or a stage.

app.py builds the Typer app and registers every command; one module per command group: models (inspect,
offgrid), quantize (quantize, eval), demo (demo-model, demo), calibrate (calibrate, imatrix, fold,
features), measure, search, apply. common.py holds what they share; no command module imports another.
"""
