"""Helpers the tests share: tiny models built from configs, checkpoints, a local hub, the small
micro run, ComfyUI's environment. Imported as ``support.<module>`` (tests/ is on sys.path)."""
