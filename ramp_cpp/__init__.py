"""ramp-cpp: RAMP mixed-precision quantization searched and deployed through llama.cpp."""

__version__ = "0.1.0"
