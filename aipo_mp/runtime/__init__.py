"""Process runtime: platform start-up and CPU shims, locks, time left, the process spawner, atomic file writes."""
