"""instructjax: InstructGPT and Codex fine-tuning recipes in JAX."""
