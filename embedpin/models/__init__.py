"""Loading model parts (diffusers pipelines, CLIP, the shipped micro model) into one dataclass."""
