"""What we know about architectures and GGUF types, as tables of records: tensor roles and fold groups per
architecture (`arch`), nominal bits → ggml types, llama.cpp's fallbacks and the bytes of every type from
`gguf.GGML_QUANT_SIZES` (`ladder`). No I/O.

Floor 2: imports only `ramp_cpp.errors`. A new architecture goes in `arch`'s tables.
"""
