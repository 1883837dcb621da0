"""File formats (tier 2): the safetensors reader and writer, and adapter directories in PEFT's
format."""
