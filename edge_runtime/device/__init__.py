"""Device side: profiling (the only OS / GPU probe), memory model, planner."""
