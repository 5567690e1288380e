"""Where things are kept: atomic writes (`atomic`), safetensors files (`stfile`), the cache and scratch
folders and the sha256 that keys them (`cache`), and the named texts (`texts`: WikiText-2 from a data folder
or fetched once through `datasets`).

Floor 2 of the package: imports only `ramp_cpp.errors` and the standard library / numpy / datasets.
"""
