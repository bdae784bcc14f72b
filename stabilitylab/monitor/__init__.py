"""Training signals: device-side recording and the flushes to the run directory."""
