"""LLaVA inference: SceneDescription models, the msgpack cache and the llama.cpp engine."""
