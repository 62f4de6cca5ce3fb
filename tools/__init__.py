"""Data preparation (`python -m tools.prepare_data`) and the demo-data generator (`python -m tools.demo`)."""
