"""synthgen serving: the BentoML service (service.service:SyntheticImages) and its Python client (service.client).

Modules: config (environment variables), catalog (manifest and file verification), backends (ONNX Runtime,
TorchScript), sampling (seed -> latents, labels, uint8 rule), batching (per-model micro-batcher), encoders
(npz / png_grid / zip / json and their decoders), schemas (request and response models), errors (the 4xx
body), middleware (auth, body limits), memory (glibc settings that keep a worker's memory flat), openapi (the
amended /docs.json), patches (BentoML fixes). Nothing here imports `training/` or, on the default path, torch.
"""

VERSION = "0.1.0"  # the project's version (pyproject.toml; a test keeps the two equal), in /docs.json
