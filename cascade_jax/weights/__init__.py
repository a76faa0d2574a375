"""Weight I/O: safetensors sources, format adapters, conversion, Orbax directories, export."""
