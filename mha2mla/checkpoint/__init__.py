"""Checkpoints on disk: reading a source lazily (:mod:`.source`), writing an output safely (:mod:`.writer`), the
target's ``config.json`` (:mod:`.target_config`), reading a checkpoint's config and shard headers without its weights
(:mod:`.meta`), and which engines serve a DeepseekV3 checkpoint with a compressed cache (:mod:`.portability`)."""
