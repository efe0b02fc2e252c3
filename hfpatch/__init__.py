"""hfpatch: pinned, reviewable patches that give Hugging Face models packed varlen training and ISP."""

__version__ = "0.1.0"
