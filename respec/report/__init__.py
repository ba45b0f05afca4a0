"""Reporting: progress display (metrics sinks and plots live in respec/rl for now)."""
