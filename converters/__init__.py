"""Format converters and quantizers (GGUF, GPTQ, MLX, LoRA)."""
