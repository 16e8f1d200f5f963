"""Small rules used everywhere, one module each: path names of a run (`paths`: `checkpoint-N/`, `ema/`), crash-safe
folder writes (`atomic`), output folders hf-ema creates (`output`), argument validation (`validation`), JSON I/O
(`jsonio`) and safetensors files written in pieces (`safetensors_files`). Import from the module that defines a
name."""
