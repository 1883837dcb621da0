"""File formats (tier 2): the safetensors reader and writer, adapter directories in PEFT's format."""
