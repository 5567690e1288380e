"""The command line: one module per command group; the only package that imports typer and rich, prints or
exits. It parses at the edge (a type name becomes a `GGMLQuantizationType` here) and calls `pipeline` or a stage.
"""
