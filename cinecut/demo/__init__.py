"""Self-made stand-ins for what CineCut needs but a test cannot download: a tiny LLaVA model, a film."""
