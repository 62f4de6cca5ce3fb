"""A trained checkpoint at work: the encoder, an image index with search, zero-shot classification, a web
service and ONNX export. Each command runs as `python -m inference.<name>`."""
