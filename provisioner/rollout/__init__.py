"""Phase 2: the engine, pushes, executors, the fleet runner and doctor."""
