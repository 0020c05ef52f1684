"""Stage 00, the world the study asks about: the procedural object world (scenes, their
questions), POPE and AMBER (vendored official files, world-built sets, official scoring) and
the question record they share (``schema.QAItem``). Reads ``csp_utils/data/benchmarks``;
writes scene folders only when asked (``scene_io.save_scenes``)."""
