"""Stage 1, calibrate: activation statistics measured through llama.cpp on calibration windows (`collect`),
their artifact `CALIB.safetensors` and its imatrix (`artifact`), and the layer embeddings the policies read
(`features`).

Floor 4: imports `errors`, `store`, `model` and `llama`.
"""
