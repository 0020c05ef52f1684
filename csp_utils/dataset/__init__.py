"""Stage 02, the CSP training data: key objects, grounding, noise inside masks, training
sources (world, COCO, JSONL, HF), the paper's perturbed rows and the grounded rows, both
built through one resumable sharded store. Reads a source (and, for grounded rows, the base
model); writes ``<run>/dataset[@tag]/`` (``store``: ``state.json``, ``shards/``, ``dataset/``,
``build_report.json``)."""
